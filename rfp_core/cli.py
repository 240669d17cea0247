"""The `rfp` command line. Each sub-command lives in the module that owns its concept;
this file only declares arguments and dispatches, importing lazily so `rfp --help` is fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from rfp_core.config import ConfigError


def _domain_dirs(parser: argparse.ArgumentParser, flags: tuple[str, ...], dest: str, required: bool, help: str) -> None:
    parser.add_argument(*flags, dest=dest, nargs="+", required=required, metavar="DIR", help=help)


def _device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")


def _torchrun(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rfp", description="RF Pix2Pix: rectified-flow image translation")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _add_config(sub) -> None:
    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the resolved config as JSON")
    show.add_argument("file")
    show.set_defaults(handler="rfp_core.config_cli:cli_show")


def _add_ingest(sub) -> None:
    ingest = sub.add_parser("ingest", help="scan domain folders into a parquet manifest and the frame store")
    _domain_dirs(ingest, ("--domain0", "-d0"), "domain0", True, "domain-0 folders, or 'random'")
    _domain_dirs(ingest, ("--domain1", "-d1"), "domain1", True, "domain-1 folders")
    ingest.add_argument("--out", required=True, help="manifest parquet file to write")
    ingest.add_argument("--store-max-side", type=int, default=512, help="cap on the stored frames' short side")
    ingest.set_defaults(handler="rfp_core.ingest:cli_ingest")


def _add_manifest(sub) -> None:
    manifest = sub.add_parser("manifest", help="query manifests").add_subparsers(dest="manifest_command", required=True)
    summary = manifest.add_parser("summary", help="per-domain counts by media type and status (DuckDB)")
    summary.add_argument("file")
    summary.set_defaults(handler="rfp_core.manifest:cli_summary")


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train saliency then velocity (the original train.py)")
    train.add_argument("--config", "-c", required=True)
    _domain_dirs(train, ("--domain0", "-d0"), "domain0", False, "domain-0 folders, or 'random'")
    _domain_dirs(train, ("--domain1", "-d1"), "domain1", False, "domain-1 folders")
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
    _device(train)
    _torchrun(train)
    train.set_defaults(handler="rfp_core.train.run:cli_train")


def _add_translate(sub) -> None:
    translate = sub.add_parser("translate", help="translate images and videos with a trained run")
    translate.add_argument("--run", required=True, help="run folder (or a velocity checkpoint file)")
    translate.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files (png jpg jpeg webp bmp), video files (mp4 mov mkv avi webm m4v) or folders "
        "of them; a video comes out S x S (its centred square translated), same frames, timestamps and audio",
    )
    translate.add_argument("--out", required=True, help="output folder, or a video file name for a single video input")
    translate.add_argument("--steps", type=int, default=None)
    translate.add_argument("--sampler", choices=["euler", "heun", "rk4"], default=None)
    translate.add_argument("--reverse", action="store_true", help="domain 1 -> domain 0 (integrate t from 1 to 0)")
    translate.add_argument(
        "--crf", type=int, default=18, help="video quality: x264 CRF, 0 = lossless, 18 = visually lossless"
    )
    translate.add_argument("--video-codec", default="libx264", help="video encoder (PyAV/FFmpeg name)")
    _device(translate)
    translate.set_defaults(handler="rfp_core.translate:cli_translate")


def _add_generate(sub) -> None:
    generate = sub.add_parser("generate", help="generate images with a run trained on domain0=random")
    generate.add_argument("--run", required=True)
    generate.add_argument("--num", type=int, required=True)
    generate.add_argument("--out", required=True)
    generate.add_argument("--steps", type=int, default=None)
    generate.add_argument("--sampler", choices=["euler", "heun", "rk4"], default=None)
    generate.add_argument("--seed", type=int, default=0)
    _device(generate)
    generate.set_defaults(handler="rfp_core.translate:cli_generate")


def _add_reflow(sub) -> None:
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
    _device(reflow)
    reflow.set_defaults(handler="rfp_core.train.reflow_run:cli_reflow")


def _add_split(sub) -> None:
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
    _device(split)
    split.set_defaults(handler="rfp_core.split:cli_split")


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="serve a registered translator over HTTP (MLflow scoring server, offline)")
    serve.add_argument("--model", default="models:/demo@champion", help="model URI (default: models:/demo@champion)")
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(handler="rfp_core.serve:cli_serve")


def _add_demo_data(sub) -> None:
    demo_data = sub.add_parser("demo-data", help="generate the two-domain demo dataset")
    demo_data.add_argument("out")
    demo_data.add_argument("--num", type=int, default=None, help="images per domain")
    demo_data.add_argument("--size", type=int, default=None)
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(handler="rfp_core.demo_data:cli_demo_data")


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks; the last output line is one JSON object")
    bench.add_argument(
        "which",
        choices=["ingest", "train", "pairing", "ablation", "reflow", "reflow_quality", "quality", "run", "faults"],
    )
    bench.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    # `quality` and `reflow_quality` only
    bench.add_argument("--seeds", type=int, default=None, help="quality: training seeds per row (default 3; --quick 1)")
    bench.add_argument("--tasks", default=None, help="quality: comma-separated, from digits,photo (default both)")
    bench.add_argument(
        "--rows",
        default=None,
        help="quality: comma-separated, from identity,tint,paper,anchored,mse,anchored_relative,paper_ot,"
        "anchored_ot,mse_ot,anchored_ot_structure,anchored_train_stop (default all); "
        "reflow_quality: the 1-RF row (default mse)",
    )
    bench.add_argument("--steps", type=int, default=None, help="quality: velocity optimizer steps per trained row")
    bench.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="train: velocity images/s at 1 and N ranks side by side (torchrun; on CPU for correctness only)",
    )
    bench.add_argument(
        "--switches",
        action="store_true",
        default=None,
        help="train: each speed switch of the velocity step off and on (table also written to docs/BENCHMARKS.md)",
    )
    bench.add_argument("--config", "-c", default=None, help="run: the config to time phase by phase")
    _device(bench)
    bench.set_defaults(handler="rfp_core.bench:cli_bench")


# the sub-commands, in `rfp --help` order
COMMANDS = (
    _add_config,
    _add_ingest,
    _add_manifest,
    _add_train,
    _add_translate,
    _add_generate,
    _add_reflow,
    _add_split,
    _add_serve,
    _add_demo_data,
    _add_bench,
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `rfp train --nproc-per-node N` starts itself again under torchrun
    module_name, func_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
