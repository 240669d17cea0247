"""Small helpers shared by the asset bodies: UI metadata and per-stage result records."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
from PIL import Image

from rfp_core.atomic import atomic_write_text

RESULT_FILE = "result.json"
KEEP_STAGE_DIRS = 2
# The Markdown image is stored in the event log and Dagster shows it at its own pixel size: small
# tiles (16-64 px) are enlarged by whole factors (nearest neighbour: sharp, and PNG packs the
# repeated pixels) until the picture is about READABLE_WIDTH wide; none is kept over MAX_INLINE_SIDE.
READABLE_WIDTH = 720
MAX_INLINE_SIDE = 1024


def readable_png(data: bytes) -> bytes:
    """The PNG at a size one reads at a glance (see READABLE_WIDTH), or unchanged when it already is."""
    with Image.open(io.BytesIO(data)) as img:
        factor = max(1, READABLE_WIDTH // img.width)
        factor = max(1, min(factor, MAX_INLINE_SIDE // max(img.size)))
        if factor == 1 and max(img.size) <= MAX_INLINE_SIDE:
            return data
        img = img.convert("RGB")
        if factor > 1:
            img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
        else:
            img.thumbnail((MAX_INLINE_SIDE, MAX_INLINE_SIDE))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return buf.getvalue()


def markdown_image(png: bytes | Path, alt: str = "grid") -> dg.MetadataValue:
    """A PNG shown in the UI at a readable size (there is no image metadata type; Markdown data
    URIs render). The caption under it says what the rows are."""
    data = readable_png(Path(png).read_bytes() if isinstance(png, Path) else png)
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})\n\n*{alt}*")


def write_result(stage_dir: Path, record: dict[str, Any]) -> Path:
    """What a stage produced and from what; the next stage receives it as its input (stage_records.py)."""
    return atomic_write_text(stage_dir / RESULT_FILE, json.dumps(record, indent=2, default=str))


def previous_result(stage_dir: Path) -> dict[str, Any]:
    """The stage's last record, or {} when it never ran."""
    path = stage_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def skipped(stage_dir: Path, reason: str, version: str = "skipped", **extra: Any) -> dg.MaterializeResult:
    """A stage with nothing to do in this configuration: recorded (so the next stage knows) and said why.

    The constant data version keeps the stages after it fresh while the configuration stays so.
    """
    write_result(stage_dir, {"skipped": True, "reason": reason, "checkpoint": None, "key": None})
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={"skipped": True, "reason": dg.MetadataValue.text(reason)},
        **extra,
    )


def stage_key(**inputs: Any) -> str:
    """A short digest of what a stage output is built from: its folder name and content version."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prune_stage_dirs(stage_dir: Path, keep: Path, n: int = KEEP_STAGE_DIRS) -> None:
    """Keep `keep` and the newest n - 1 other key folders of a stage."""
    dirs = sorted((d for d in stage_dir.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in [d for d in dirs if d != keep][n - 1 :]:
        shutil.rmtree(d, ignore_errors=True)


def run_tags(context: dg.AssetExecutionContext, **extra: Any) -> dict[str, Any]:
    """MLflow tags that link a run back to the Dagster run and the partition's inputs."""
    return {
        "dagster_run_id": context.run.run_id,
        "dagster_asset": context.asset_key.to_user_string(),
        "partition": context.partition_key,
        **extra,
    }
