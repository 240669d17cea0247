"""One optimizer step of phase 1, and the state the phase's loop moves on.

A step classifies one image of each domain per pair (blend training: points on the path between
them, labelled by how far along), with label smoothing. Every random draw is seeded by the step
or the sample's position, so the step is the same at any world size and on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rfp_core.config import ModelConfig
from rfp_core.nets.saliency import SaliencyNet
from rfp_core.train import distributed
from rfp_core.train.saliency_stop import StopRule

SALT_BLEND, SALT_P, SALT_P_FLIP = 11, 12, 13  # per-step / per-sample draws (train/distributed.py)


@dataclass
class SaliencyRun:
    """What phase 1's steps read and move on: nets, optimizer, and what its state record holds."""

    cfg: ModelConfig
    world: distributed.World
    device: torch.device
    codec: nn.Module
    net: SaliencyNet
    ckpt_path: Path
    state_path: Path
    lineage: dict
    accuracy: float = 0.0
    warmed_up: bool = False
    steps: int = 0
    rule: StopRule | None = None
    # stopped_by, report_accuracy, holdout_accuracy (the newest held-out evaluation)
    report: dict = field(default_factory=dict)
    separate: bool = True  # report_separate: stop and report frames differ
    opt: torch.optim.Optimizer | None = None
    ddp: nn.Module | None = None


def train_step(p: SaliencyRun, batch: dict, share: float) -> tuple[float, float]:
    """One optimizer step on this rank's shard (augmented by the loader); returns the global batch's
    loss and accuracy (label: the majority domain), the same on every rank."""
    sc, codec, device, seed, step = p.cfg.saliency, p.codec, p.device, p.cfg.seed, p.steps
    pos = batch["position"]
    x0, x1 = codec.encode(batch["domain_0"].to(device)), codec.encode(batch["domain_1"].to(device))
    n = x0.shape[0]
    blend = torch.rand((), generator=torch.Generator().manual_seed(distributed.position_seed(seed, step, SALT_BLEND)))
    if sc.blend_fraction > 0 and blend < sc.blend_fraction:
        # blend training: points on the path x_t, labelled [1 - t, t] by how far along they are
        # (the flipped half pairs frames within a rank's shard: with several ranks, other pairs)
        x0, x1 = torch.cat([x0, x0.flip(0)]), torch.cat([x1, x1])
        p1 = torch.cat(
            [
                distributed.per_sample(lambda g: torch.rand(1, generator=g), seed, pos, salt)
                for salt in (SALT_P, SALT_P_FLIP)
            ]
        ).to(device)
        x = torch.lerp(x0, x1, p1.view(-1, 1, 1, 1))
    else:
        x = torch.cat([x0, x1])
        p1 = torch.cat([torch.zeros(n, device=device), torch.ones(n, device=device)])
    eps = sc.label_smoothing
    target = torch.stack([1 - p1, p1], dim=1) * (1 - eps) + eps / 2  # label smoothing
    logits = p.ddp(x)
    loss = F.cross_entropy(logits, target)
    p.opt.zero_grad(set_to_none=True)
    (loss * share * p.world.size).backward()
    p.opt.step()
    accuracy = (logits.detach().argmax(1) == (p1 > 0.5).long()).float().mean()
    both = p.world.sum_(torch.stack([loss.detach(), accuracy]).view(2) * share)
    return float(both[0]), float(both[1])
