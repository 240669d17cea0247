"""`rfp bench`."""

from __future__ import annotations

from rfp_core.cli import args as common


def _quality_rows() -> str:
    # the row table is plain dicts (no torch behind `rfp --help`), but it reads configs/translate.json:
    # without that file the rest of the CLI still starts
    try:
        from rfp_core.bench.quality_configs import ROWS
    except (OSError, ValueError):
        return "the rows of rfp_core/bench/quality_configs.py"
    return ",".join(ROWS)


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks; the last output line is one JSON object")
    bench.add_argument(
        "which",
        choices=["ingest", "train", "pairing", "ablation", "reflow", "reflow_quality", "quality", "run", "faults"],
    )
    bench.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    # `quality` and `reflow_quality` only
    bench.add_argument(
        "--seeds", type=int, default=None, help="quality, ablation: training seeds per row (default 3; --quick 1)"
    )
    bench.add_argument(
        "--seed",
        type=int,
        default=None,
        help="reflow_quality, ablation: only this seed, cached for a later --seeds N run",
    )
    bench.add_argument(
        "--tasks", default=None, help="quality: from digits,photo,digits_heldout,digits_paired (default all)"
    )
    bench.add_argument(
        "--rows",
        default=None,
        help=f"quality: comma-separated, from {_quality_rows()} (default all); "
        "reflow_quality: the 1-RF row (default mse)",
    )
    bench.add_argument("--steps", type=int, default=None, help="quality: velocity optimizer steps per trained row")
    bench.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="train: velocity images/s at 1 and N ranks side by side (torchrun; on CPU for correctness only)",
    )
    bench.add_argument("--config", "-c", default=None, help="run: the config to time phase by phase")
    bench.add_argument(
        "--switches",
        action="store_true",
        default=None,
        help="train: each speed switch of the velocity step off and on (table also written to docs/BENCHMARKS.md)",
    )
    common.device(bench)
    bench.set_defaults(handler=run)


def run(args) -> int:
    import importlib

    from rfp_core.bench import OPTIONS, emit
    from rfp_core.bench.report import publish
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
    emit(publish(module.run(quick=args.quick, device=args.device, **extra)))  # a full run's docs written here
    return 0
