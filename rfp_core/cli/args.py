"""Arguments several `rfp` commands share."""

from __future__ import annotations

import argparse

from rfp_core.train.launch import TORCHRUN_FLAGS


def domain_dirs(parser: argparse.ArgumentParser, flags: tuple[str, ...], dest: str, required: bool, help: str) -> None:
    parser.add_argument(*flags, dest=dest, nargs="+", required=required, metavar="DIR", help=help)


def device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")


def torchrun(parser: argparse.ArgumentParser) -> None:
    """torchrun's own flags (README "Scaling out"), passed through to `python -m torch.distributed.run`."""
    group = parser.add_argument_group("data-parallel training (torchrun)")
    group.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="start N training processes on this machine through torchrun (one per GPU)",
    )
    for flag in TORCHRUN_FLAGS:
        group.add_argument(flag, default=None, help=f"torchrun {flag} (multi-node)")
