"""`rfp bench ingest|train|pairing|ablation|reflow|quality|faults`: each prints one JSON object as its last line."""

from __future__ import annotations

import importlib
import json


def emit(result: dict) -> None:
    """The contract of every benchmark: its last output line is one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)


QUALITY_ONLY = ("seeds", "tasks", "rows", "steps")


def cli_bench(args) -> int:
    from rfp_core.config import ConfigError

    module = importlib.import_module(f"rfp_core.bench.{args.which}")
    extra = {k: getattr(args, k, None) for k in QUALITY_ONLY if getattr(args, k, None) is not None}
    if extra and args.which != "quality":
        raise ConfigError(f"--{' --'.join(extra)}: only `rfp bench quality` takes these options")
    emit(module.run(quick=args.quick, device=args.device, **extra))
    return 0
