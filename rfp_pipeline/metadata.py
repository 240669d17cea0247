"""Small helpers shared by the asset bodies: UI metadata and per-stage result records."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import dagster as dg
from PIL import Image

from rfp_core.atomic import atomic_write_text

RESULT_FILE = "result.json"
# the Markdown image is stored in the event log: keep it a thumbnail
MAX_INLINE_SIDE = 512


def markdown_image(png: bytes | Path, alt: str = "grid") -> dg.MetadataValue:
    """A PNG shown inline in the UI (there is no image metadata type; Markdown data URIs render)."""
    data = Path(png).read_bytes() if isinstance(png, Path) else png
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) > MAX_INLINE_SIDE:
            img = img.convert("RGB")
            img.thumbnail((MAX_INLINE_SIDE, MAX_INLINE_SIDE))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})")


def write_result(stage_dir: Path, record: dict[str, Any]) -> Path:
    """What a stage produced and from what; the next stage reads it (and people can too)."""
    return atomic_write_text(stage_dir / RESULT_FILE, json.dumps(record, indent=2, default=str))


def read_result(stage_dir: Path, asset: str, partition: str) -> dict[str, Any]:
    path = stage_dir / RESULT_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: materialise '{asset}' for partition '{partition}' first"
        )
    return json.loads(path.read_text())


def run_tags(context: dg.AssetExecutionContext, **extra: Any) -> dict[str, Any]:
    """MLflow tags that link a run back to the Dagster run and the partition's inputs."""
    return {
        "dagster_run_id": context.run.run_id,
        "dagster_asset": context.asset_key.to_user_string(),
        "partition": context.partition_key,
        **extra,
    }
