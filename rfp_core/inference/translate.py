"""Use a trained run: translate images (domain 0 -> 1, or back with `reverse`) or generate from noise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from rfp_core.config import ConfigError, ModelConfig
from rfp_core.config_files import config_from_dict
from rfp_core.flow import rf
from rfp_core.media.images import load_image
from rfp_core.train.retry_bar import target_confidence


class Translator:
    """The EMA velocity net of a run, its codec and its sampling settings."""

    def __init__(
        self,
        cfg: ModelConfig,
        velocity: nn.Module,
        codec: nn.Module,
        device: torch.device,
        critic: nn.Module | None = None,
        retry_bar: float = 0.5,
    ):
        self.cfg, self.net, self.codec, self.device = cfg, velocity, codec, device
        # phase 1's domain classifier and the confidence `velocity.translate_retry_noise` holds outputs to
        self.critic, self.retry_bar = critic, retry_bar
        self.flow_evaluations = 0  # velocity-net calls per image, summed over every image translated

    @classmethod
    def from_run(cls, path: str | Path, device: str | torch.device | None = None, retry: bool = True) -> "Translator":
        """`path` = a run folder of this project (its velocity.pt) or of the original trainer
        (config.json + velocity_*.ckpt), or a velocity checkpoint file of either. `retry` False:
        translate without the run's `velocity.translate_retry_noise`."""
        from rfp_core.device import pick_device
        from rfp_core.original import find_original_run, is_original_run, load_original_nets
        from rfp_core.train.codec_io import load_codec
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
            raise ConfigError(
                f"{path}: no velocity checkpoint; train the run first (rfp train) or name a velocity "
                ".pt file (or an original run folder with config.json and velocity_*.ckpt)"
            )
        net, ckpt = load_velocity(path, device)
        cfg = config_from_dict(ckpt["config"], source=str(path))
        codec = load_codec(cfg, None, device, state=ckpt.get("codec") or None)
        if retry and cfg.velocity.translate_retry_noise and "retry_bar" not in ckpt:
            print(
                f"note: {path} has no retry bar (a reflowed model, or trained before the retry): every image at one σ",
                file=sys.stderr,
            )
            retry = False
        if not retry:
            cfg = cfg.model_copy(update={"velocity": cfg.velocity.model_copy(update={"translate_retry_noise": []})})
        if not cfg.velocity.translate_retry_noise:
            return cls(cfg, net, codec, device)
        return cls(cfg, net, codec, device, retry_critic(path, ckpt, device), float(ckpt["retry_bar"]))

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

    def set_translate_noise(self, sigma: float) -> "Translator":
        """Translate from X0 + sigma * eps from now on (`velocity.translate_noise`), whatever the run
        trained with."""
        if sigma < 0:
            raise ConfigError(f"the source noise at translation must be >= 0, not {sigma}")
        # retry levels must rise above it: those at or below the new σ are dropped
        retry = [r for r in self.cfg.velocity.translate_retry_noise if r > sigma]
        velocity = self.cfg.velocity.model_copy(
            update={"translate_noise": float(sigma), "translate_retry_noise": retry}
        )
        self.cfg = self.cfg.model_copy(update={"velocity": velocity})
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(x.to(self.device))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(z).clamp(-1, 1)

    @torch.no_grad()
    def start(self, x: torch.Tensor, shared_noise: bool = False, sigma: float | None = None) -> torch.Tensor:
        """The flow's starting points for domain-0 images: their encodings plus the run's source noise
        (`sigma`, else `velocity.translate_noise`, else `source_noise`; each image its own draw, seeded
        by the image, or with `shared_noise` one draw for all: a video's frames)."""
        z = self.encode(x)
        sigma = self.cfg.velocity.translate_sigma if sigma is None else sigma
        if sigma > 0 and not self.generative:
            period = self.cfg.velocity.source_noise_lowpass
            z = z + rf.source_noise(z, sigma, seed=self.cfg.seed, shared=shared_noise, lowpass_period=period)
        return z

    @torch.no_grad()
    def translate(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        sampler: str | None = None,
        reverse: bool = False,
        shared_noise: bool = False,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> translated images; `reverse` integrates t from 1 to 0 (domain 1 -> 0,
        no source noise added); `shared_noise`: see `start` (a video keeps its one σ: no retry, so its
        texture stays steady frame to frame)."""
        if reverse:
            return self.decode(self._flow(self.encode(x), steps, sampler, reverse=True))
        z = self._flow(self.start(x, shared_noise), steps, sampler)
        if self.critic is not None and not shared_noise:
            z = self._retry(x, z, steps, sampler)
        return self.decode(z)

    def _flow(self, z: torch.Tensor, steps: int | None, sampler: str | None, reverse: bool = False) -> torch.Tensor:
        vc = self.cfg.velocity
        steps, sampler = steps or vc.num_inference_steps, sampler or vc.sampler
        self.flow_evaluations += len(z) * rf.nfe(sampler, steps)
        return rf.integrate(self.velocity, z, steps, sampler, reverse)

    def _retry(self, x: torch.Tensor, z: torch.Tensor, steps: int | None, sampler: str | None) -> torch.Tensor:
        """Translate again, from each `translate_retry_noise` σ in turn, the outputs the domain classifier
        is less sure of than `retry_bar` (they kept too much of their input to pass as the target); the
        last try stands."""
        todo = torch.arange(len(z), device=z.device)  # an accepted output is never judged again
        for sigma in self.cfg.velocity.translate_retry_noise:
            todo = todo[target_confidence(self.critic, z[todo]) < self.retry_bar]
            if len(todo) == 0:
                break
            z[todo] = self._flow(self.start(x[todo.to(x.device)], sigma=sigma), steps, sampler)
        return z

    @torch.no_grad()
    def generate(self, n: int, seed: int = 0, steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        """`n` images from Gaussian noise (in the codec's latent space), reproducible by `seed`."""
        side = self.size // self.codec.downsample
        g = torch.Generator().manual_seed(seed)
        z = self.codec.sample_random_latent((n, self.codec.latent_channels, side, side), self.device, generator=g)
        z = rf.integrate(
            self.velocity,
            z,
            steps or self.cfg.velocity.num_inference_steps,
            sampler=sampler or self.cfg.velocity.sampler,
        )
        return self.decode(z)

    def load_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files -> (B, 3, size, size) in [-1, 1] with the centred square crop."""
        return torch.stack([load_image(p, self.size) for p in paths])


def retry_critic(path: Path, ckpt: dict, device: torch.device) -> nn.Module:
    """The run's saliency net, for `velocity.translate_retry_noise`: the one beside `path`, else the one
    the checkpoint names (a run folder moved since training keeps it beside velocity.pt)."""
    from rfp_core.train.saliency import load_saliency

    named = [Path(ckpt["saliency_checkpoint"])] if ckpt.get("saliency_checkpoint") else []
    for cand in [path.parent / "saliency.pt", path.parent / "saliency_imported.pt", *named]:
        if cand.is_file():
            return load_saliency(cand, device)
    raise ConfigError(
        f"{path}: velocity.translate_retry_noise is set but the run has no saliency classifier (no saliency.pt "
        "beside it) to tell which outputs to translate again: train the run with this config (phase 1 then "
        "trains), or translate without the retry (rfp translate --no-retry)"
    )


def output_names(paths: list[Path]) -> list[str]:
    """One `<stem>.png` per input; a repeated stem gets `-2`, `-3`, ... so nothing is overwritten."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        seen[p.stem] = seen.get(p.stem, 0) + 1
        names.append(f"{p.stem}.png" if seen[p.stem] == 1 else f"{p.stem}-{seen[p.stem]}.png")
    return names


def run_translator(run: str, steps: int | None, device, retry: bool = True) -> "Translator":
    """The run's 1-RF flow, or for 1-2 steps its straighter reflowed / distilled model when
    `rfp reflow` made one (it says which)."""
    folder = Path(run)
    reflowed = (
        folder.is_dir()
        and (folder / "velocity.pt").is_file()
        and ((folder / "distilled").is_dir() or any(folder.glob("reflow_*/velocity.pt")))
    )
    if reflowed and steps in (1, 2):
        from rfp_core.train.reflow_run import translator_for_steps

        return translator_for_steps(folder, steps, device)[0]
    return Translator.from_run(run, device=device, retry=retry)
