"""Domain folders -> frame store + parquet manifest (`rfp ingest`).

Work is skipped at two levels, so re-running over unchanged folders is cheap:
- hashing: `HashCache` maps a stat fingerprint to the md5, so an unchanged file is not read;
- decoding: the rows a source produced are cached by its md5 in one packed parquet file,
  `store/sources/_pack.parquet` (10,000 small sources are one read, not 10,000), and videos and
  zips also in their own `store/sources/<md5>.parquet`, written as soon as they are decoded.
  A cached source whose frames are all in the store is not decoded again.

Sources with any skipped row are not cached: their failure may come from a setting (the
pixel limit) or the environment (permissions), so they are tried again next time.
A video that fails part way keeps the frames decoded before the failure as 'ok' rows and
adds one 'skipped' row keyed `md5:frame:N` at the failing frame N, carrying the reason.

Sources that vanish or change while they are read are one 'skipped' row each (their frames,
keyed by the md5 taken before the change, are taken out of the store again); a domain folder
that vanishes is an IngestError. A store or cache that cannot be written (disk full) stops
ingestion with StoreWriteError: no manifest is written, and every file left in the store is
complete (temp file + rename; temp files of killed writers are swept at the next ingest).
Two ingests may share a store at once: frames are written by rename, and the caches merge
what the other saved under a file lock.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from rfp_core import paths
from rfp_core.atomic import sweep_temps
from rfp_core.media.decode import FolderError, MediaError, MediaFile, discover, iter_frames
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.hashing import HashCache
from rfp_core.media.manifest import MANIFEST_SCHEMA, content_version, write_manifest
from rfp_core.media.source_cache import SourceCache

PACK_EVERY_S = 60.0  # a crash loses at most this much decoding work


class IngestError(ValueError):
    """Ingestion cannot start (a domain folder is missing); the message names it."""


@dataclass
class IngestReport:
    manifest_path: Path
    table: pa.Table
    n_ok: int
    n_skipped: int
    frames_decoded: int
    frames_reused: int
    files_hashed: int
    per_domain: dict[int, dict[str, int]] = field(default_factory=dict)  # {domain: {"ok": n, "skipped": m}}
    content_version: str = ""
    seconds: float = 0.0


class StoreWriteError(RuntimeError):
    """Writing the frame store failed (disk full, permissions): that stops ingestion, it is no skip."""


FULL_DISK_HINT = (
    "Free space (or fix permissions) under $RFP_HOME, or point RFP_HOME at a larger disk, and run "
    "again: frames already stored are complete and are reused, no manifest was written"
)


class FrameWriter:
    """Writes frames to the store on a few threads while the main thread decodes the next ones.

    Pillow releases the GIL while it resizes and while it encodes to a real file, so resize +
    PNG encode, the bulk of ingest time, run in parallel. At most 2 x threads frames wait in
    memory."""

    def __init__(self, store: FrameStore, threads: int | None = None):
        self.store = store
        self.threads = threads if threads is not None else min(8, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rfp-store") if self.threads > 1 else None
        self.pending: deque[Future] = deque()
        self.submitted: set[str] = set()
        self.created: set[str] = set()  # keys this writer stored (not there before)

    def has(self, key: str) -> bool:
        """In the store, or on its way there."""
        return key in self.submitted or self.store.has(key)

    def put(self, key: str, image: Image.Image) -> None:
        self.submitted.add(key)
        if self.pool is None:
            self._put(key, image)
            return
        self.pending.append(self.pool.submit(self._put, key, image))
        while len(self.pending) > 2 * self.threads:
            self.pending.popleft().result()

    def _put(self, key: str, image: Image.Image) -> None:
        try:
            existed = self.store.has(key)
            self.store.put(key, image)
        except OSError as exc:
            raise StoreWriteError(
                f"cannot write frame {key!r} to the store {self.store.frames_dir}: {exc}. {FULL_DISK_HINT}"
            ) from exc
        if not existed:
            self.created.add(key)

    def discard(self, keys: list[str]) -> None:
        """Take back frames this writer stored (their source changed while it was read)."""
        self.drain()
        for key in keys:
            self.submitted.discard(key)
            if key in self.created:
                self.created.discard(key)
                self.store.remove(key)

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


def _skip(key: str, media: MediaFile, index: int, reason: str) -> dict[str, Any]:
    return {
        "frame_key": key,
        "media_type": media.media_type,
        "frame_index": index,
        "timestamp": None,
        "width": None,
        "height": None,
        "status": "skipped",
        "error": reason,
    }


def _changed(media: MediaFile, fingerprint: tuple[int, int, int] | None) -> str | None:
    """Why the source is no longer what was hashed (None when it still is)."""
    if fingerprint is None:
        return None
    try:
        st = os.stat(media.path)
    except OSError as exc:
        return f"vanished while being ingested ({exc.strerror}); its frames were not kept"
    if (st.st_size, st.st_mtime_ns, st.st_ino) != fingerprint:
        return (
            "changed while being ingested (size, mtime or inode differ from when it was hashed); its frames "
            "were not kept: run ingest again once it is written"
        )
    return None


def decode_source(
    media: MediaFile, md5: str, writer: FrameWriter, fingerprint: tuple[int, int, int] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Decode every frame of one source into the store; returns its rows and the frames decoded.

    `fingerprint`: the stat the file had when `md5` was taken. When the file differs after
    decoding, the frames may not be the md5's content: they are discarded, one skipped row."""
    rows, decoded = _decode_rows(media, md5, writer)
    if (reason := _changed(media, fingerprint)) is not None:
        writer.discard([r["frame_key"] for r in rows if r["status"] == "ok"])
        return [_skip(md5, media, 0, reason)], 0
    return rows, decoded


def _decode_rows(media: MediaFile, md5: str, writer: FrameWriter) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    decoded = 0
    try:
        if media.path.stat().st_size == 0:
            raise MediaError("empty file (0 bytes)")
        for frame in iter_frames(media):
            if media.kind == "zip":
                key = f"{md5}:member:{frame.member}"
            elif media.kind == "video":
                key = f"{md5}:frame:{frame.index}"
            else:
                key = md5
            if frame.error is not None:
                rows.append(_skip(key, media, frame.index, frame.error))
                continue
            writer.put(key, frame.image)
            decoded += 1
            rows.append(
                {
                    "frame_key": key,
                    "media_type": media.media_type,
                    "frame_index": frame.index,
                    "timestamp": frame.timestamp,
                    "width": frame.image.width,
                    "height": frame.image.height,
                    "status": "ok",
                    "error": None,
                }
            )
    except (MediaError, OSError) as exc:
        reason = str(exc) if isinstance(exc, MediaError) else f"cannot read file: {exc}"
        if media.kind == "video" and rows:
            rows.append(_skip(f"{md5}:frame:{len(rows)}", media, len(rows), reason))
        else:
            rows.append(_skip(md5, media, 0, reason))
    if not rows:  # a zip without a single image member
        rows.append(_skip(md5, media, 0, "archive holds no image members (png, jpg, jpeg)"))
    return rows, decoded


def _domain_list(value: list[Path] | Literal["random"] | None) -> list[Path]:
    if value is None or value == "random" or (isinstance(value, (list, tuple)) and list(map(str, value)) == ["random"]):
        return []
    return [Path(v) for v in value]


def ingest(
    domain0: list[Path] | Literal["random"],
    domain1: list[Path],
    out: Path | None = None,
    store: FrameStore | None = None,
    progress: bool = True,
) -> IngestReport:
    """Scan both domains, decode new frames into the store, write the manifest to `out`.

    domain0 `random` (generative mode) contributes no rows. Unreadable inputs become
    'skipped' rows; only a missing domain folder raises (IngestError).
    """
    start = time.perf_counter()
    store = store or FrameStore()
    domains = _check_domains(domain0, domain1)
    for folder in (store.root, paths.cache_dir()):  # temp files of ingests killed mid-write
        sweep_temps(folder)
    hashes = HashCache()
    rows, counts = _scan(domains, store, hashes, progress)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    version = content_version(table)
    out = Path(out) if out is not None else paths.rfp_home() / "manifests" / f"{version[:16]}.parquet"
    try:
        write_manifest(table, out)
    except OSError as exc:
        raise StoreWriteError(
            f"cannot write the manifest {out}: {exc}. {FULL_DISK_HINT.replace(', no manifest was written', '')}"
        ) from exc
    statuses = table.column("status").to_pylist()
    per_domain = {d: {"ok": 0, "skipped": 0} for d in (0, 1)}
    for d, s in zip(table.column("domain").to_pylist(), statuses):
        per_domain[d][s] += 1
    return IngestReport(
        manifest_path=out,
        table=table,
        n_ok=statuses.count("ok"),
        n_skipped=statuses.count("skipped"),
        frames_decoded=counts["decoded"],
        frames_reused=counts["reused"],
        files_hashed=hashes.hashed,
        per_domain=per_domain,
        content_version=version,
        seconds=time.perf_counter() - start,
    )


def _check_domains(domain0, domain1) -> dict[int, list[Path]]:
    domains = {0: _domain_list(domain0), 1: _domain_list(domain1)}
    missing = [str(p) for dirs in domains.values() for p in dirs if not p.exists()]
    if missing:
        raise IngestError(
            f"domain folder(s) not found: {', '.join(missing)} (check the paths, or use 'random' for domain0)"
        )
    if not domains[1]:
        raise IngestError("domain1 needs at least one folder")
    return domains


def _scan(
    domains: dict[int, list[Path]], store: FrameStore, hashes: HashCache, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every domain's rows, frames decoded into the store; the caches saved even when it fails."""
    sources = SourceCache(store.root)
    writer = FrameWriter(store)
    rows: list[dict[str, Any]] = []
    counts = {"decoded": 0, "reused": 0}
    try:
        for domain, dirs in domains.items():
            try:
                media_files = discover(dirs)
            except FolderError as exc:
                raise IngestError(f"{exc}; no manifest was written") from None
            _ingest_domain(domain, media_files, hashes, sources, writer, rows, counts, progress)
        writer.close()  # every frame is on disk before the manifest says so
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            writer.close()
        with contextlib.suppress(Exception):
            _save_caches(hashes, sources)
        raise
    _save_caches(hashes, sources)
    return rows, counts


def _save_caches(hashes: HashCache, sources: SourceCache) -> None:
    try:
        hashes.save()
        sources.save_pack()
    except OSError as exc:
        raise StoreWriteError(
            f"cannot write the ingest caches under {hashes.path.parent} / {sources.dir}: {exc}. {FULL_DISK_HINT}"
        ) from exc


def _ingest_domain(
    domain: int,
    media_files: list[MediaFile],
    hashes: HashCache,
    sources: SourceCache,
    writer: FrameWriter,
    rows: list[dict[str, Any]],
    counts: dict[str, int],
    progress: bool,
) -> None:
    last_pack = time.perf_counter()
    bar = tqdm(media_files, desc=f"ingest domain{domain}", unit="file", disable=not progress, leave=False)
    for media in bar:
        base = {"domain": domain, "source_path": str(media.path)}
        try:
            md5 = hashes.md5(media.path)
        except OSError as exc:
            rows.append(
                {**base, "source_md5": None, **_skip(f"unreadable:{media.path}", media, 0, f"cannot read file: {exc}")}
            )
            continue
        cached = sources.get(md5)
        if cached is not None and all(
            r["media_type"] == media.media_type and (r["status"] != "ok" or writer.has(r["frame_key"])) for r in cached
        ):
            source_rows = cached
            counts["reused"] += sum(r["status"] == "ok" for r in cached)
        else:
            source_rows, n = decode_source(media, md5, writer, hashes.fingerprint(media.path))
            counts["decoded"] += n
            if all(r["status"] == "ok" for r in source_rows):
                sources.put(md5, source_rows, own_file=media.kind != "image")
        if time.perf_counter() - last_pack > PACK_EVERY_S:
            writer.drain()
            sources.save_pack()
            last_pack = time.perf_counter()
        rows.extend({**base, "source_md5": md5, **r} for r in source_rows)
        if progress:
            bar.set_postfix(frames=counts["decoded"] + counts["reused"], refresh=False)
