"""`rfp bench ingest|train|pairing|ablation|reflow`: each prints one JSON object as its last line."""

from __future__ import annotations

import importlib
import json


def emit(result: dict) -> None:
    """The contract of every benchmark: its last output line is one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)


def cli_bench(args) -> int:
    module = importlib.import_module(f"rfp_core.bench.{args.which}")
    emit(module.run(quick=args.quick, device=args.device))
    return 0
