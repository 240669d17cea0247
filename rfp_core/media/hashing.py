"""md5 content hashes, and a cache so an unchanged file is never hashed twice.

The cache maps a path to the md5 it had at a stat fingerprint (size, mtime_ns, inode). A file
whose fingerprint changed (touched, rewritten, replaced) is hashed again; its md5 (and so every
frame key) stays the same when only the mtime moved.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rfp_core import paths
from rfp_core.atomic import atomic_path, file_lock

_CHUNK = 1 << 20
HASH_CACHE_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("inode", pa.int64()), ("md5", pa.string())]
)


def md5_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class HashCache:
    """Stat fingerprint -> md5, persisted as parquet. `save` merges with what other processes
    saved meanwhile (under a file lock), so two ingests at once both keep their entries."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else paths.cache_dir() / "hash_cache.parquet"
        self.hashed = 0  # real hash computations since construction (tests and benchmarks read it)
        self._dirty = False
        self._touched: set[str] = set()  # paths hashed by this object: they win a merge
        self._fingerprints: dict[str, tuple[int, int, int]] = {}
        self._entries = self._read()

    def _read(self) -> dict[str, tuple[int, int, int, str]]:
        if not self.path.exists():
            return {}
        try:
            table = pq.read_table(self.path)
            cols = [table.column(n).to_pylist() for n in ("path", "size", "mtime_ns", "inode", "md5")]
            return {p: (s, m, i, h) for p, s, m, i, h in zip(*cols)}
        except (OSError, pa.ArrowException, KeyError):
            return {}  # a damaged cache is only a cache: start over

    def __len__(self) -> int:
        return len(self._entries)

    def md5(self, path: str | os.PathLike) -> str:
        """md5 of the file, from the cache when its fingerprint is unchanged. OSError if unreadable."""
        key = os.path.abspath(path)
        st = os.stat(key)
        fingerprint = (st.st_size, st.st_mtime_ns, st.st_ino)
        self._fingerprints[key] = fingerprint
        hit = self._entries.get(key)
        if hit is not None and hit[:3] == fingerprint:
            return hit[3]
        digest = md5_file(key)
        self.hashed += 1
        self._entries[key] = (*fingerprint, digest)
        self._touched.add(key)
        self._dirty = True
        return digest

    def fingerprint(self, path: str | os.PathLike) -> tuple[int, int, int] | None:
        """The (size, mtime_ns, inode) the file had when `md5` last looked at it (before reading it):
        a file whose stat differs afterwards changed while it was being read."""
        return self._fingerprints.get(os.path.abspath(path))

    hash = md5  # the name docs/ARCHITECTURE.md uses

    def save(self) -> Path:
        """Write the cache atomically (skipped when nothing changed)."""
        if not self._dirty and self.path.exists():
            return self.path
        with file_lock(self.path):
            merged = self._read()  # entries another process saved since we loaded
            merged.update({k: self._entries[k] for k in self._touched})
            self._entries = {**self._entries, **merged}
            self._write(sorted(self._entries.items()))
        self._dirty = False
        return self.path

    def _write(self, items: list) -> None:
        table = pa.table(
            {
                "path": [k for k, _ in items],
                "size": [v[0] for _, v in items],
                "mtime_ns": [v[1] for _, v in items],
                "inode": [v[2] for _, v in items],
                "md5": [v[3] for _, v in items],
            },
            schema=HASH_CACHE_SCHEMA,
        )
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
