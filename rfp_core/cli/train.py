"""`rfp train`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rfp_core.cli import args as common


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train saliency then velocity (the original train.py)")
    train.add_argument("--config", "-c", required=True)
    common.domain_dirs(train, ("--domain0", "-d0"), "domain0", False, "domain-0 folders, or 'random'")
    common.domain_dirs(train, ("--domain1", "-d1"), "domain1", False, "domain-1 folders")
    train.add_argument("--checkpoint", "-ckpt", default=None, help="resume from (or initialise with) this checkpoint")
    train.add_argument("--codec-ckpt", default=None, help="use this codec (original .ckpt or codec.pt); skips phase 0")
    train.add_argument(
        "--saliency-ckpt", default=None, help="use this saliency net (original .ckpt or saliency.pt); skips phase 1"
    )
    train.add_argument(
        "--velocity-ckpt",
        default=None,
        help="continue the velocity from this checkpoint (an original .ckpt: its step is read from the file name)",
    )
    train.add_argument("--codec-only", action="store_true", help="stop after the codec (phase 0)")
    train.add_argument("--saliency-only", action="store_true", help="stop after the saliency net (phase 1)")
    train.add_argument(
        "--paired",
        action="store_true",
        help="paired mode (pix2pix): files with the same name in -d0 and -d1 are pairs; plain MSE, no saliency",
    )
    train.add_argument(
        "--run-id", default=None, help="run folder name under $RFP_HOME/runs (default: run_<YYYYmmddHHMM>)"
    )
    train.add_argument(
        "--dev", action="store_true", help="development mode: no experiment tracking, '_dev' in the run name"
    )
    train.add_argument(
        "--smoke", action="store_true", help="tiny budget and frequent samples, to check a setup quickly"
    )
    train.add_argument(
        "--restart",
        action="store_true",
        help="phases of this --run-id built from other inputs (data, config, checkpoints) train afresh "
        "instead of being refused; their old files move to superseded/ in the run folder",
    )
    common.device(train)
    common.torchrun(train)
    train.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import os

    from rfp_core.checkpoint import CheckpointError
    from rfp_core.config import ConfigError
    from rfp_core.config_files import load_config
    from rfp_core.media.ingest import IngestError, StoreWriteError
    from rfp_core.train.resume import ResumeRefused
    from rfp_core.train.run import Imports, folders, train_run
    from rfp_core.train.saliency import SaliencyThresholdNotReached
    from rfp_core.train.velocity import NonFiniteLoss

    cfg = load_config(args.config)
    domain0 = folders(args.domain0 if args.domain0 else cfg.domain0, "domain0")
    domain1 = folders(args.domain1 if args.domain1 else cfg.domain1, "domain1")
    files = {
        name: _existing_file(getattr(args, attr), flag)
        for name, attr, flag in (
            ("checkpoint", "checkpoint", "--checkpoint"),
            ("codec", "codec_ckpt", "--codec-ckpt"),
            ("saliency", "saliency_ckpt", "--saliency-ckpt"),
            ("velocity", "velocity_ckpt", "--velocity-ckpt"),
        )
    }
    only = "codec" if args.codec_only else "saliency" if args.saliency_only else None
    if args.nproc_per_node is not None and args.paired:
        raise ConfigError("--paired trains in one process (paired mode is not data-parallel): drop --nproc-per-node")
    if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:  # not yet under torchrun: start it
        from rfp_core.train.launch import torchrun

        return torchrun(args)
    try:
        run_dir = train_run(
            cfg,
            domain0,
            domain1,
            run_id=args.run_id,
            checkpoint=files["checkpoint"],
            dev=args.dev,
            device=args.device,
            imports=Imports(files["codec"], files["saliency"], files["velocity"]),
            only=only,
            smoke=args.smoke,
            track=not args.dev,
            force=args.restart,
            paired=args.paired,
        )
    except (
        SaliencyThresholdNotReached,
        NonFiniteLoss,
        CheckpointError,
        ResumeRefused,
        IngestError,
        StoreWriteError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(run_dir)
    return 0


def _existing_file(value: str | None, flag: str) -> Path | None:

    from rfp_core.config import ConfigError

    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    return path
