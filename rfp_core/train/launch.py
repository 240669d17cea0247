"""`rfp train --nproc-per-node N [torchrun flags]`: run this same command under torchrun.

torchrun (`python -m torch.distributed.run`) starts N processes of `python -m rfp_core.cli train ...`
(the command line less the torchrun flags) with RANK / WORLD_SIZE / LOCAL_RANK set; each joins the
process group in `train/distributed.py`. One machine: `--standalone` (a free local port); several:
torchrun's own `--nnodes --node-rank --master-addr --master-port` or `--rdzv-*` flags, passed on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Sequence

from rfp_core.config import ConfigError

# torchrun's multi-node flags: passed on as given
TORCHRUN_FLAGS = (
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv-id",
)
OWN_FLAGS = ("--nproc-per-node", *TORCHRUN_FLAGS)


def strip_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """argv without `flags` and their values (`--flag value` and `--flag=value`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not any(arg.startswith(f + "=") for f in flags):
            out.append(arg)
    return out


def torchrun_command(args: argparse.Namespace) -> list[str]:
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node {args.nproc_per_node}: start at least one process")
    passed = {f: getattr(args, f[2:].replace("-", "_")) for f in TORCHRUN_FLAGS}
    flags = [x for f, v in passed.items() if v is not None for x in (f, str(v))]
    multi_node = any(v is not None for v in passed.values())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(args.nproc_per_node),
        *([] if multi_node else ["--standalone"]),
        *flags,
        "-m",
        "rfp_core.cli",
        *strip_flags(args.argv, OWN_FLAGS),
    ]


def torchrun(args: argparse.Namespace) -> int:
    command = torchrun_command(args)
    print("starting: " + " ".join(command), file=sys.stderr)
    return subprocess.run(command).returncode
