"""`rfp split`."""

from __future__ import annotations

import sys
from pathlib import Path

from rfp_core.cli import args as common


def add_parser(sub) -> None:
    split = sub.add_parser("split", help="sort an unsorted folder into domain0 / domain1 / uncertain")
    split.add_argument(
        "--run",
        "--checkpoint",
        "-ckpt",
        dest="run",
        required=True,
        help="run folder (this project's or the original trainer's) or a saliency checkpoint file",
    )
    split.add_argument("--input", "-i", nargs="+", required=True, metavar="DIR")
    split.add_argument("--output", "-o", required=True)
    split.add_argument("--threshold", "-t", type=float, default=0.7)
    split.add_argument("--ignore", default=None, help="file listing paths or md5s to leave out, one a line")
    common.device(split)
    split.set_defaults(handler=run)


def run(args) -> int:
    """`rfp split --run DIR --input DIR... --output DIR [--threshold 0.7] [--ignore FILE]`."""
    from rfp_core.inference.split import LABELS, split_folder

    try:
        report = split_folder(
            Path(args.run),
            [Path(p) for p in args.input],
            Path(args.output),
            threshold=args.threshold,
            ignore=Path(args.ignore) if args.ignore else None,
            device=args.device,
        )
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(", ".join(f"{label}: {report.counts[label]}" for label in LABELS))
    print(
        f"duplicates skipped {report.duplicates}, already in the output {report.already_sorted}, ignored "
        f"{report.ignored}"
    )
    for problem in report.unreadable:
        print(f"unreadable: {problem}", file=sys.stderr)
    print(f"report: {report.report_path}")
    return 0
