"""`rfp translate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rfp_core.cli import args as common


def add_translate(sub) -> None:
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
        "--noise",
        type=float,
        default=None,
        metavar="SIGMA",
        help="source noise at translation (default: the run's velocity.translate_noise, else its source_noise); "
        "lower keeps more of the input, higher invents more texture",
    )
    translate.add_argument(
        "--no-retry",
        action="store_true",
        help="translate every image once, at the one σ, without the run's velocity.translate_retry_noise",
    )
    translate.add_argument(
        "--crf", type=int, default=18, help="video quality: x264 CRF, 0 = lossless, 18 = visually lossless"
    )
    translate.add_argument("--video-codec", default="libx264", help="video encoder (PyAV/FFmpeg name)")
    common.device(translate)
    translate.set_defaults(handler=run_translate)


def add_generate(sub) -> None:
    generate = sub.add_parser("generate", help="generate images with a run trained on domain0=random")
    generate.add_argument("--run", required=True)
    generate.add_argument("--num", type=int, required=True)
    generate.add_argument("--out", required=True)
    generate.add_argument("--steps", type=int, default=None)
    generate.add_argument("--sampler", choices=["euler", "heun", "rk4"], default=None)
    generate.add_argument("--seed", type=int, default=0)
    common.device(generate)
    generate.set_defaults(handler=run_generate)


def run_translate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from rfp_core.config import ConfigError
    from rfp_core.inference.translate import output_names, run_translator
    from rfp_core.media.images import ImageLoadError, find_images, load_image, save_png

    tr = run_translator(args.run, args.steps, args.device, retry=not args.no_retry)
    if args.noise is not None:
        tr.set_translate_noise(args.noise)
    if tr.generative:
        print(f"note: {args.run} was trained with domain0=random; translating from images anyway", file=sys.stderr)
    from rfp_core.inference.video import split_video_inputs

    videos, args.inputs = split_video_inputs(args.inputs)  # videos go to rfp_core.inference.video
    video_rc = _translate_videos(tr, videos, args, other_inputs=bool(args.inputs)) if videos else 0
    if not args.inputs:
        return video_rc
    try:
        paths = find_images(args.inputs)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if not paths:
        raise ConfigError(f"no image files (png, jpg, jpeg, webp, bmp) found in {' '.join(args.inputs)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch, failed, written = tr.cfg.velocity.sample_batch_size, 0, 0
    items = list(zip(paths, output_names(paths)))
    for i in tqdm(range(0, len(items), batch), desc="translate", unit="batch"):
        chunk = []
        for path, name in items[i : i + batch]:
            try:
                chunk.append((load_image(path, tr.size), name))
            except ImageLoadError as exc:
                print(f"skipped: {exc}", file=sys.stderr)
                failed += 1
        if not chunk:
            continue
        y = tr.translate(
            torch.stack([x for x, _ in chunk]), steps=args.steps, sampler=args.sampler, reverse=args.reverse
        )
        for img, (_, name) in zip(y, chunk):
            save_png(img, out / name)
            written += 1
    direction = "domain 1 -> 0" if args.reverse else "domain 0 -> 1"
    print(
        f"translated {written} image(s) ({direction}) into {out}" + (f"; {failed} skipped" if failed else ""),
        file=sys.stderr,
    )
    return max(video_rc, 1 if failed else 0)


def run_generate(args: argparse.Namespace) -> int:

    from rfp_core.config import ConfigError
    from rfp_core.inference.translate import Translator
    from rfp_core.media.images import save_png

    tr = Translator.from_run(args.run, device=args.device)
    if not tr.generative:
        raise ConfigError(
            f"{args.run} was trained for translation (domain0 = image folders), not from noise; "
            "use `rfp translate`, or train a run with --domain0 random to generate"
        )
    if args.num < 1:
        raise ConfigError("--num must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = tr.cfg.velocity.sample_batch_size
    for start in range(0, args.num, batch):
        n = min(batch, args.num - start)
        # a seed per batch: the same --seed and --num give the same images
        y = tr.generate(n, seed=args.seed + start, steps=args.steps, sampler=args.sampler)
        for k, img in enumerate(y):
            save_png(img, out / f"{start + k:05d}.png")
    print(f"generated {args.num} image(s) into {out}", file=sys.stderr)
    return 0


def _translate_videos(tr, videos: Sequence[Path], args: argparse.Namespace, other_inputs: bool) -> int:
    """The video half of `rfp translate`: 0 when every video was written, 1 when one failed."""
    from rfp_core.config import ConfigError
    from rfp_core.inference.video import VideoTranslateError, translate_video, video_outputs

    try:
        outs = video_outputs(videos, Path(args.out), other_inputs)
    except VideoTranslateError as exc:
        raise ConfigError(str(exc)) from None
    steps, sampler, reverse = args.steps, args.sampler, args.reverse
    failed = 0
    for src, dst in zip(videos, outs):
        try:
            translate_video(
                src,
                dst,
                lambda x: tr.translate(x, steps, sampler, reverse, shared_noise=True),  # steady texture frame to frame
                tr.size,
                batch_size=tr.cfg.velocity.sample_batch_size,
                codec=getattr(args, "video_codec", "libx264"),
                crf=getattr(args, "crf", 18),
            )
        except VideoTranslateError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def add_parser(sub) -> None:
    add_translate(sub)
    add_generate(sub)
