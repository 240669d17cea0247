"""The sample grids phase 2 writes while it trains: fixed inputs (or fixed noise) through the EMA net."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rfp_core.config import ModelConfig
from rfp_core.flow import rf
from rfp_core.media.datasets import FrameDataset
from rfp_core.media.images import save_grid


def sample_inputs(cfg: ModelConfig, manifest: Path, store, n: int) -> torch.Tensor | None:
    """A fixed set of domain-0 frames (held-out first) for the periodic sample grids."""
    for split in ("holdout", "all"):
        try:
            ds = FrameDataset(
                manifest,
                store,
                0,
                cfg.max_size,
                split=split,
                holdout_fraction=cfg.saliency.holdout_fraction,
                train_crop=False,
            )
        except ValueError:  # no frames in this split
            continue
        # evenly spaced: consecutive frames of one video would fill the grid with one scene
        idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique().tolist()
        return torch.stack([ds[i] for i in idx])
    return None


class SampleGrids:
    """`samples/step_<step>.png`: the inputs above their translations (generative: a row of samples)."""

    def __init__(self, cfg: ModelConfig, codec: nn.Module, device: torch.device, out_dir: Path, inputs):
        self.cfg, self.codec, self.device, self.dir, self.inputs = cfg, codec, device, out_dir / "samples", inputs
        self.noise: torch.Tensor | None = None  # generative: drawn once, from the seed

    @torch.no_grad()
    def write(self, net: nn.Module, at: int) -> Path:
        cfg, vc, codec = self.cfg, self.cfg.velocity, self.codec
        if cfg.generative:
            if self.noise is None:
                g = torch.Generator().manual_seed(cfg.seed)
                side = cfg.max_size // codec.downsample
                self.noise = codec.sample_random_latent(
                    (vc.sample_batch_size, codec.latent_channels, side, side), generator=g
                )
            z = rf.integrate(net, self.noise.to(self.device), vc.num_inference_steps, sampler=vc.sampler)
            rows = [codec.decode(z)]
        else:
            z0 = codec.encode(self.inputs.to(self.device))
            if vc.translate_sigma > 0:  # as `Translator.start` draws it
                z0 = z0 + rf.source_noise(z0, vc.translate_sigma, seed=cfg.seed, lowpass_period=vc.source_noise_lowpass)
            rows = [self.inputs, codec.decode(rf.integrate(net, z0, vc.num_inference_steps, sampler=vc.sampler))]
        return save_grid(rows, self.dir / f"step_{at:08d}.png")
