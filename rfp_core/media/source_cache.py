"""The decoded-source cache of `rfp ingest`: md5 -> the rows that source produced, kept per source
(`store/sources/<md5>.parquet`, videos and zips) and packed in one parquet file for many small ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rfp_core.atomic import atomic_path, file_lock
from rfp_core.media.manifest import MANIFEST_SCHEMA

# the columns of a source's rows that depend only on its bytes (domain and path are per use)
SOURCE_COLUMNS = ["frame_key", "media_type", "frame_index", "timestamp", "width", "height", "status", "error"]
SOURCE_SCHEMA = pa.schema([MANIFEST_SCHEMA.field(n) for n in SOURCE_COLUMNS])
PACK_SCHEMA = pa.schema([pa.field("source_md5", pa.string()), *SOURCE_SCHEMA])


class SourceCache:
    """md5 -> the source's content rows, persisted per source and as one packed parquet file."""

    def __init__(self, root: Path):
        self.dir = root / "sources"
        self.pack_path = self.dir / "_pack.parquet"
        self._new: set[str] = set()
        self._rows = self._read_pack()

    def get(self, md5: str) -> list[dict[str, Any]] | None:
        rows = self._rows.get(md5)
        if rows is None:
            path = self.dir / f"{md5}.parquet"
            if not path.exists():
                return None
            try:
                rows = pq.read_table(path).select(SOURCE_COLUMNS).to_pylist()
            except (OSError, pa.ArrowException, KeyError):
                return None
            self._rows[md5] = rows
            self._new.add(md5)  # not in the pack yet
        return rows

    def put(self, md5: str, rows: list[dict[str, Any]], own_file: bool = True) -> None:
        """`own_file=False` (single images) keeps the rows for the pack only: a parquet file per
        image costs more than decoding it again (~20 ms vs a few ms, measured)."""
        if own_file:
            with atomic_path(self.dir / f"{md5}.parquet") as tmp:
                pq.write_table(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), tmp)
        self._rows[md5] = rows
        self._new.add(md5)

    def _read_pack(self) -> dict[str, list[dict[str, Any]]]:
        rows: dict[str, list[dict[str, Any]]] = {}
        if self.pack_path.exists():
            try:
                for row in pq.read_table(self.pack_path).to_pylist():
                    rows.setdefault(row.pop("source_md5"), []).append(row)
            except (OSError, pa.ArrowException, KeyError):
                return {}
        return rows

    def save_pack(self) -> None:
        """Write the pack, merged with what another ingest packed meanwhile (under a lock)."""
        if not self._new:
            return
        with file_lock(self.pack_path):
            self._rows = {**self._read_pack(), **self._rows}
            packed = [{"source_md5": md5, **row} for md5, rows in sorted(self._rows.items()) for row in rows]
            with atomic_path(self.pack_path) as tmp:
                pq.write_table(pa.Table.from_pylist(packed, schema=PACK_SCHEMA), tmp)
        self._new.clear()
