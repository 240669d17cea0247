"""`rfp bench ingest|train|pairing|ablation|reflow|reflow_quality|quality|run|faults`: each prints one JSON object
as its last line."""

from __future__ import annotations

import json


def emit(result: dict) -> None:
    """The contract of every benchmark: its last output line is one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)


QUALITY_ONLY = ("seeds", "tasks", "rows", "steps")
REFLOW_QUALITY = ("seeds", "rows", "steps", "seed")
OPTIONS = {
    "quality": QUALITY_ONLY,
    "ablation": ("seeds", "seed"),
    "reflow_quality": REFLOW_QUALITY,
    "run": ("config",),
    "train": ("nproc_per_node", "switches"),
}
