"""The bar `velocity.translate_retry_noise` holds a translation to: how sure phase 1's domain classifier
is of *real* target images, measured once at the end of phase 2 and kept in velocity.pt.

A fixed probability would mean different things from run to run: one classifier calls 10% of real
target images the source, another is sure of nearly all (docs/BENCHMARKS.md). So the bar is the
`translate_retry_quantile` of its confidence on the run's own domain-1 frames: an output is translated
again when the classifier is less sure of it than of all but that share of real targets. The frames
are the held-out ones that neither trained the classifier nor stopped it ("report"), else the whole
held-out split, else the training frames (a folder too small to hold any out)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rfp_core.config import ModelConfig
from rfp_core.media.datasets import FrameDataset

MAX_FRAMES = 256  # a 10% quantile then rests on ~25 frames


@torch.no_grad()
def target_confidence(critic: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """(B,) the domain classifier's probability that each latent is a domain-1 image."""
    return critic(z).float().softmax(dim=1)[:, 1]


def _target_frames(cfg: ModelConfig, manifest: Path, store) -> FrameDataset:
    for split in ("report", "holdout", "train"):
        try:
            return FrameDataset(
                manifest, store, 1, cfg.max_size, split, cfg.saliency.holdout_fraction, train_crop=False
            )
        except ValueError:  # no frames in this split
            continue
    raise ValueError(f"{manifest}: no usable domain-1 frames to measure the retry bar on")


@torch.no_grad()
def retry_bar(cfg: ModelConfig, manifest: Path, store, codec: nn.Module, saliency: Path, device) -> float:
    """The classifier's `translate_retry_quantile` confidence on up to MAX_FRAMES real domain-1 frames."""
    from rfp_core.train.saliency import load_saliency

    critic = load_saliency(saliency, device)
    frames = _target_frames(cfg, manifest, store)
    n = min(len(frames), MAX_FRAMES)
    confidences = []
    for i in range(0, n, 64):
        batch = torch.stack([frames[j] for j in range(i, min(i + 64, n))]).to(device)
        confidences.append(target_confidence(critic, codec.encode(batch)))
    return float(torch.cat(confidences).quantile(cfg.velocity.translate_retry_quantile))
