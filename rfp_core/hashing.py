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
from rfp_core.atomic import atomic_path

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
    """Stat fingerprint -> md5, persisted as parquet. Not shared-writer safe: the last `save` wins,
    which only costs the other writer some re-hashing next time."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else paths.cache_dir() / "hash_cache.parquet"
        self.hashed = 0  # real hash computations since construction (tests and benchmarks read it)
        self._entries: dict[str, tuple[int, int, int, str]] = {}
        self._dirty = False
        if self.path.exists():
            try:
                table = pq.read_table(self.path)
                cols = [table.column(n).to_pylist() for n in ("path", "size", "mtime_ns", "inode", "md5")]
                self._entries = {p: (s, m, i, h) for p, s, m, i, h in zip(*cols)}
            except (OSError, pa.ArrowException, KeyError):
                self._entries = {}  # a damaged cache is only a cache: start over

    def __len__(self) -> int:
        return len(self._entries)

    def md5(self, path: str | os.PathLike) -> str:
        """md5 of the file, from the cache when its fingerprint is unchanged. OSError if unreadable."""
        key = os.path.abspath(path)
        st = os.stat(key)
        fingerprint = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = self._entries.get(key)
        if hit is not None and hit[:3] == fingerprint:
            return hit[3]
        digest = md5_file(key)
        self.hashed += 1
        self._entries[key] = (*fingerprint, digest)
        self._dirty = True
        return digest

    hash = md5  # the name docs/ARCHITECTURE.md uses

    def save(self) -> Path:
        """Write the cache atomically (skipped when nothing changed)."""
        if not self._dirty and self.path.exists():
            return self.path
        items = sorted(self._entries.items())
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
        self._dirty = False
        return self.path
