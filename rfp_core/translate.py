"""Use a trained run: translate images (domain 0 -> 1, or back with `reverse`) or generate from noise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from rfp_core import flow
from rfp_core.config import ConfigError, ModelConfig, config_from_dict
from rfp_core.images import ImageLoadError, find_images, load_image, save_png


class Translator:
    """The EMA velocity net of a run, its codec and its sampling settings."""

    def __init__(self, cfg: ModelConfig, velocity: nn.Module, codec: nn.Module, device: torch.device):
        self.cfg, self.net, self.codec, self.device = cfg, velocity, codec, device

    @classmethod
    def from_run(cls, path: str | Path, device: str | torch.device | None = None) -> "Translator":
        """`path` = a run folder of this project (its velocity.pt) or of the original trainer
        (config.json + velocity_*.ckpt), or a velocity checkpoint file of either."""
        from rfp_core.original import find_original_run, is_original_run, load_original_nets
        from rfp_core.train.codec_io import load_codec
        from rfp_core.device import pick_device
        from rfp_core.train.velocity import load_velocity

        path = Path(path)
        device = pick_device(device)
        if path.suffix == ".ckpt" and path.is_file() and is_original_run(path.parent):
            run = find_original_run(path.parent)
            run.velocity = path
            return cls(run.cfg, *load_original_nets(run, device), device)
        if path.is_dir() and not (path / "velocity.pt").is_file() and is_original_run(path):
            run = find_original_run(path)
            return cls(run.cfg, *load_original_nets(run, device), device)
        if path.is_dir():
            path = path / "velocity.pt"
        if not path.is_file():
            raise ConfigError(f"{path}: no velocity checkpoint; train the run first (rfp train) or name a velocity "
                              ".pt file (or an original run folder with config.json and velocity_*.ckpt)")
        net, ckpt = load_velocity(path, device)
        cfg = config_from_dict(ckpt["config"], source=str(path))
        codec = load_codec(cfg, None, device, state=ckpt.get("codec") or None)
        return cls(cfg, net, codec, device)

    @property
    def size(self) -> int:
        return self.cfg.max_size

    @property
    def generative(self) -> bool:
        return self.cfg.generative

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x, t) of the EMA net, in model (codec) space."""
        return self.net(x, t)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(x.to(self.device))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(z).clamp(-1, 1)

    @torch.no_grad()
    def translate(self, x: torch.Tensor, steps: int | None = None, sampler: str | None = None, reverse: bool = False) -> torch.Tensor:
        """Images in [-1, 1] -> translated images; `reverse` integrates t from 1 to 0 (domain 1 -> 0)."""
        z = flow.integrate(self.velocity, self.encode(x), steps or self.cfg.velocity.num_inference_steps,
                           sampler=sampler or self.cfg.velocity.sampler, reverse=reverse)
        return self.decode(z)

    @torch.no_grad()
    def generate(self, n: int, seed: int = 0, steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        """`n` images from Gaussian noise (in the codec's latent space), reproducible by `seed`."""
        side = self.size // self.codec.downsample
        g = torch.Generator().manual_seed(seed)
        z = self.codec.sample_random_latent((n, self.codec.latent_channels, side, side), self.device, generator=g)
        z = flow.integrate(self.velocity, z, steps or self.cfg.velocity.num_inference_steps,
                           sampler=sampler or self.cfg.velocity.sampler)
        return self.decode(z)

    def load_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files -> (B, 3, size, size) in [-1, 1] with the centred square crop."""
        return torch.stack([load_image(p, self.size) for p in paths])


def _out_names(paths: list[Path]) -> list[str]:
    """One `<stem>.png` per input; a repeated stem gets `-2`, `-3`, ... so nothing is overwritten."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        seen[p.stem] = seen.get(p.stem, 0) + 1
        names.append(f"{p.stem}.png" if seen[p.stem] == 1 else f"{p.stem}-{seen[p.stem]}.png")
    return names


def _run_translator(run: str, steps: int | None, device) -> "Translator":
    """The run's 1-RF flow, or for 1-2 steps its straighter reflowed / distilled model when
    `rfp reflow` made one (it says which)."""
    folder = Path(run)
    reflowed = folder.is_dir() and (folder / "velocity.pt").is_file() and (
        (folder / "distilled").is_dir() or any(folder.glob("reflow_*/velocity.pt")))
    if reflowed and steps in (1, 2):
        from rfp_core.train.reflow_run import translator_for_steps

        return translator_for_steps(folder, steps, device)[0]
    return Translator.from_run(run, device=device)


def cli_translate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    tr = _run_translator(args.run, args.steps, args.device)
    if tr.generative:
        print(f"note: {args.run} was trained with domain0=random; translating from images anyway", file=sys.stderr)
    from rfp_core.video_translate import cli_translate_videos, split_video_inputs

    videos, args.inputs = split_video_inputs(args.inputs)  # videos go to rfp_core.video_translate
    video_rc = cli_translate_videos(tr, videos, args, other_inputs=bool(args.inputs)) if videos else 0
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
    items = list(zip(paths, _out_names(paths)))
    for i in tqdm(range(0, len(items), batch), desc="translate", unit="batch"):
        chunk = []
        for path, name in items[i:i + batch]:
            try:
                chunk.append((load_image(path, tr.size), name))
            except ImageLoadError as exc:
                print(f"skipped: {exc}", file=sys.stderr)
                failed += 1
        if not chunk:
            continue
        y = tr.translate(torch.stack([x for x, _ in chunk]), steps=args.steps, sampler=args.sampler, reverse=args.reverse)
        for img, (_, name) in zip(y, chunk):
            save_png(img, out / name)
            written += 1
    direction = "domain 1 -> 0" if args.reverse else "domain 0 -> 1"
    print(f"translated {written} image(s) ({direction}) into {out}" + (f"; {failed} skipped" if failed else ""), file=sys.stderr)
    return max(video_rc, 1 if failed else 0)


def cli_generate(args: argparse.Namespace) -> int:
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
