"""The media manifest: one parquet row per frame (or per source that could not be read).

Columns (MANIFEST_SCHEMA): frame_key, domain (0|1), source_path, source_md5 (null when the
file could not be read), media_type ('image' | 'video' | 'zip_image'), frame_index (frame
number in a video, member number in a zip, 0 for an image; for a skipped row the frame at
which reading failed), timestamp (seconds, videos only), width/height (of the decoded source
frame, before the store's cap; null when skipped), status ('ok' | 'skipped'), error (the skip
reason; null when ok).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from rfp_core.atomic import atomic_path

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("frame_key", pa.string(), nullable=False),
        pa.field("domain", pa.int8(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("source_md5", pa.string()),
        pa.field("media_type", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)
STATUSES = ("ok", "skipped")
MEDIA_TYPES = ("image", "video", "zip_image")


def to_table(table_or_rows: pa.Table | Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) or a table -> a table with exactly MANIFEST_SCHEMA's columns and types."""
    if isinstance(table_or_rows, pa.Table):
        missing = [n for n in MANIFEST_SCHEMA.names if n not in table_or_rows.column_names]
        if missing:
            raise ValueError(f"manifest table lacks columns {missing}")
        return table_or_rows.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    return pa.Table.from_pylist(list(table_or_rows), schema=MANIFEST_SCHEMA)


def write_manifest(table_or_rows: pa.Table | Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    table = to_table(table_or_rows)
    bad = set(table.column("status").to_pylist()) - set(STATUSES)
    if bad:
        raise ValueError(f"manifest status must be one of {STATUSES}, got {sorted(bad)}")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_manifest(path: str | os.PathLike) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist; write one with `rfp ingest ... --out {path}`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path} is not a readable parquet manifest: {exc}") from None
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path} is not a media manifest: columns {missing} are missing")
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def content_version(path_or_table: str | os.PathLike | pa.Table) -> str:
    """Digest of the sorted distinct (frame_key, domain, status): what the data *is*.

    Paths, mtimes and file copies do not enter it, so touching or moving a file keeps the
    version and adding one image changes it. Later stages use it as their data version.
    """
    table = path_or_table if isinstance(path_or_table, pa.Table) else read_manifest(path_or_table)
    triples = set(
        zip(
            table.column("frame_key").to_pylist(),
            table.column("domain").to_pylist(),
            table.column("status").to_pylist(),
        )
    )
    digest = hashlib.sha256()
    for key, domain, status in sorted(triples):
        digest.update(f"{key}\t{domain}\t{status}\n".encode("utf-8"))
    return digest.hexdigest()


def ok_frames(table: pa.Table, domain: int) -> list[str]:
    """Distinct frame keys of `domain` with status ok, in manifest order (copies count once)."""
    keys = table.column("frame_key").to_pylist()
    domains = table.column("domain").to_pylist()
    statuses = table.column("status").to_pylist()
    return list(dict.fromkeys(k for k, d, s in zip(keys, domains, statuses) if d == domain and s == "ok"))


def summarize(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Row counts per (domain, media_type, status), computed by DuckDB over the parquet file."""
    read_manifest(path)  # a clear error for a missing or foreign file
    with duckdb.connect() as con:
        cur = con.execute(
            "SELECT domain, media_type, status, count(*) AS count FROM read_parquet(?) "
            "GROUP BY ALL ORDER BY domain, media_type, status",
            [str(path)],
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def skip_reasons(path: str | os.PathLike, limit: int = 20) -> list[dict[str, Any]]:
    with duckdb.connect() as con:
        cur = con.execute(
            "SELECT domain, source_path, frame_index, error FROM read_parquet(?) "
            "WHERE status = 'skipped' ORDER BY domain, source_path, frame_index LIMIT ?",
            [str(path), limit],
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def format_summary(rows: list[dict[str, Any]]) -> str:
    header = ("domain", "media_type", "status", "count")
    body = [tuple(str(r[h]) for h in header) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i in (0, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *(line(b) for b in body)])
