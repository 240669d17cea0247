"""`rfp bench ingest|train|pairing|ablation|reflow|reflow_quality|quality`: each prints one JSON object as its last line."""

from __future__ import annotations

import importlib
import json


def emit(result: dict) -> None:
    """The contract of every benchmark: its last output line is one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)


QUALITY_ONLY = ("seeds", "tasks", "rows", "steps")
REFLOW_QUALITY = ("seeds", "rows", "steps")


def cli_bench(args) -> int:
    from rfp_core.config import ConfigError

    module = importlib.import_module(f"rfp_core.bench.{args.which}")
    extra = {k: getattr(args, k, None) for k in QUALITY_ONLY if getattr(args, k, None) is not None}
    takes = QUALITY_ONLY if args.which == "quality" else REFLOW_QUALITY if args.which == "reflow_quality" else ()
    if set(extra) - set(takes):
        raise ConfigError(f"--{' --'.join(set(extra) - set(takes))}: only `rfp bench quality` "
                          "(and reflow_quality: --seeds --rows --steps) takes these options")
    emit(module.run(quick=args.quick, device=args.device, **extra))
    return 0
