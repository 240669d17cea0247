"""`rfp bench ingest|train|pairing|ablation|reflow|reflow_quality|quality|run|faults`: each prints one JSON object
as its last line."""

from __future__ import annotations

import importlib
import json


def emit(result: dict) -> None:
    """The contract of every benchmark: its last output line is one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)


QUALITY_ONLY = ("seeds", "tasks", "rows", "steps")
REFLOW_QUALITY = ("seeds", "rows", "steps")
OPTIONS = {
    "quality": QUALITY_ONLY,
    "reflow_quality": REFLOW_QUALITY,
    "run": ("config",),
    "train": ("nproc_per_node", "switches"),
}


def cli_bench(args) -> int:
    from rfp_core.config import ConfigError

    module = importlib.import_module(f"rfp_core.bench.{args.which}")
    every = {k for ks in OPTIONS.values() for k in ks}
    extra = {k: getattr(args, k) for k in sorted(every) if getattr(args, k, None) is not None}
    wrong = sorted(set(extra) - set(OPTIONS.get(args.which, ())))
    if wrong:
        takers = "; ".join(f"{b}: --{' --'.join(ks)}" for b, ks in OPTIONS.items())
        raise ConfigError(f"--{' --'.join(wrong)}: `rfp bench {args.which}` does not take these ({takers})")
    if extra.pop("switches", None):  # every speed switch of the velocity step, off and on
        module = importlib.import_module("rfp_core.bench.train_switches")
    if "nproc_per_node" in extra:  # data-parallel training: 1 rank and N ranks side by side
        module = importlib.import_module("rfp_core.bench.train_ddp")
        extra = {"nproc": extra.pop("nproc_per_node")}
    emit(module.run(quick=args.quick, device=args.device, **extra))
    return 0
