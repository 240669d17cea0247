"""`rfp reflow`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rfp_core.cli import args as common


def add_parser(sub) -> None:
    reflow = sub.add_parser("reflow", help="straighten a trained run (k-RF) and distil it to one step")
    reflow.add_argument("--run", required=True, help="run folder holding velocity.pt (and manifest.parquet)")
    reflow.add_argument(
        "--rounds", type=int, default=1, help="reflow rounds: 1 -> reflow_1 (2-RF), 2 -> reflow_2 (3-RF)"
    )
    reflow.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="couplings per round (default: every training domain-0 frame; 1024 noise draws in generative mode)",
    )
    reflow.add_argument("--distill", action="store_true", help="also fit a one-step map -> distilled/velocity.pt")
    reflow.add_argument("--steps-solver", type=int, default=16, help="ODE steps for the couplings (default 16)")
    reflow.add_argument("--solver", choices=["euler", "heun", "rk4"], default="rk4")
    reflow.add_argument(
        "--train-steps", type=int, default=None, help="optimizer steps per product (default: the run's velocity budget)"
    )
    reflow.add_argument(
        "--loss",
        choices=["mse", "saliency"],
        default="mse",
        help="k-RF loss on the coupling (default: straight-line MSE; saliency uses the run's saliency.pt)",
    )
    reflow.add_argument(
        "--from-scratch", action="store_true", help="new nets start from random weights, not the previous flow"
    )
    reflow.add_argument("--shard-size", type=int, default=64, help="couplings per stored shard")
    reflow.add_argument("--report-inputs", type=int, default=32, help="held-out inputs in the steps table")
    reflow.add_argument("--no-report", action="store_true", help="skip the straightness / steps table")
    common.device(reflow)
    reflow.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    from rfp_core.checkpoint import CheckpointError
    from rfp_core.config import ConfigError
    from rfp_core.flow.reflow import Solver
    from rfp_core.train.reflow_report import write_report
    from rfp_core.train.reflow_run import reflow_run

    run = Path(args.run)
    if not run.is_dir():
        raise ConfigError(f"--run {run}: not a run folder (expected $RFP_HOME/runs/<run_id>/ with velocity.pt)")
    try:
        res = reflow_run(
            run,
            rounds=args.rounds,
            pairs=args.pairs,
            distill=args.distill,
            solver=Solver(args.solver, args.steps_solver),
            train_steps=args.train_steps,
            loss=args.loss,
            from_scratch=args.from_scratch,
            shard_size=args.shard_size,
            device=args.device,
        )
    except (FloatingPointError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.no_report:
        md = write_report(run, device=args.device, n=args.report_inputs, solver=Solver(args.solver, args.steps_solver))
        print(md)
    print(
        json.dumps(
            {
                "flows": [str(p) for p in res.flows],
                "distilled": str(res.distilled) if res.distilled else None,
                "couplings": [str(c.root) for c in res.couplings],
            }
        )
    )
    return 0
