"""`rfp bench ingest|train|pairing|ablation|reflow|quality`: each prints one JSON object as its last line."""

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
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None:  # data-parallel training: 1 rank and N ranks side by side
        if args.which != "train":
            raise ConfigError("--nproc-per-node: only `rfp bench train` takes it")
        module = importlib.import_module("rfp_core.bench.train_ddp")
        extra = {**extra, "nproc": nproc}
    emit(module.run(quick=args.quick, device=args.device, **extra))
    return 0
