"""The `rfp` command line: one module per sub-command in this package (`rfp ingest` ->
`rfp_core/cli/ingest.py`), each with `add_parser` (its arguments) and `run` (calls the library,
prints, returns the exit code). The library below never prints for the CLI; the commands import it
inside `run`, so `rfp --help` stays fast."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rfp_core.cli import bench, config, demo_data, ingest, manifest, reflow, serve, split, train, translate
from rfp_core.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rfp", description="RF Pix2Pix: rectified-flow image translation")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


# the sub-commands, in `rfp --help` order
COMMANDS = (config, ingest, manifest, train, translate, reflow, split, serve, demo_data, bench)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `rfp train --nproc-per-node N` starts itself again under torchrun
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
