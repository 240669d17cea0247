"""One optimizer step of phase 2, and the window of steps a log line averages.

A step's global batch is the sample positions [s*B, (s+1)*B) of the step-indexed data order;
this rank trains its shard of it in micro-batches, every per-sample draw (timestep, generative
noise) seeded by the sample's position, so the step is the same at any world size and on resume
(train/distributed.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rfp_core.config import ModelConfig
from rfp_core.flow import rf
from rfp_core.flow.coupling import Coupler
from rfp_core.train import distributed
from rfp_core.train.anchor import RelativeAnchor
from rfp_core.train.ema import EMA

# per-sample draws (train/distributed.py): timestep, generative noise, source noise and its σ
SALT_T, SALT_NOISE, SALT_SOURCE, SALT_SOURCE_SIGMA = 1, 2, 3, 4


@dataclass
class VelocityRun:
    """What phase 2's steps read and move on: settings, nets, optimizer, data and the step."""

    cfg: ModelConfig
    out_dir: Path
    world: distributed.World
    device: torch.device
    codec: nn.Module
    model: nn.Module  # holds the weights; forward and backward go through `ddp`
    ema: EMA
    opt: torch.optim.Optimizer
    use_saliency: bool
    h: Callable | None  # the saliency net's latent layer (the loss's weighting), None for plain MSE
    anchor: RelativeAnchor | None
    couple: Coupler | None
    lineage: dict = field(default_factory=dict)
    step: int = 0
    start: int = 0  # the step this call's budget counts from (an original checkpoint's step, else 0)
    total: int = 0
    ddp: nn.Module | None = None
    batches: Iterator[dict] | None = None
    micro_sizes: list[int] = field(default_factory=list)
    autocast: Any = field(default_factory=contextlib.nullcontext)

    @property
    def mse_weight(self) -> float | RelativeAnchor:
        # the anchor's weight: a number, or a share of the saliency term (train/anchor.py)
        return self.anchor if self.anchor is not None else self.cfg.velocity.mse_weight


def _pair(run: VelocityRun, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, x1, t) of a micro-batch, in the codec's latent space (x0 with its source noise, if any)."""
    cfg, codec, device = run.cfg, run.codec, run.device
    pos = batch["position"]  # per-sample draws by position: the same at any world size
    with torch.no_grad():
        x1 = codec.encode(batch["domain_1"].to(device, non_blocking=True))
        x0 = (
            distributed.per_sample(
                lambda g, shape=(1, *x1.shape[1:]): codec.sample_random_latent(shape, generator=g),
                cfg.seed,
                pos,
                SALT_NOISE,
            ).to(device)
            if cfg.generative
            else codec.encode(batch["domain_0"].to(device, non_blocking=True))
        )
        if cfg.velocity.source_noise > 0 and not cfg.generative:
            eps = distributed.per_sample(
                lambda g, shape=(1, *x0.shape[1:]): torch.randn(shape, generator=g), cfg.seed, pos, SALT_SOURCE
            )
            eps = rf.lowpass(eps, cfg.velocity.source_noise_lowpass)
            x0 = x0 + _source_sigma(cfg, pos).to(device) * eps.to(device)
        if run.couple is not None:  # minibatch OT: re-pair the drawn x1 with the drawn x0 (within a rank's shard)
            x1 = run.couple(batch, x0, x1)
    t = distributed.per_sample(
        lambda g: rf.sample_timesteps(1, cfg.velocity.timestep_sampling, generator=g), cfg.seed, pos, SALT_T
    ).to(device)
    return x0, x1, t


def _source_sigma(cfg: ModelConfig, pos) -> torch.Tensor:
    """σ of each sample's source noise: `source_noise`, or with `source_noise_min` one drawn
    uniformly from [source_noise_min, source_noise] (seeded by position)."""
    vc = cfg.velocity
    if vc.source_noise_min is None:
        return torch.tensor(vc.source_noise)
    u = distributed.per_sample(lambda g: torch.rand(1, generator=g), cfg.seed, pos, SALT_SOURCE_SIGMA)
    return (vc.source_noise_min + (vc.source_noise - vc.source_noise_min) * u).view(-1, 1, 1, 1)


def accumulate_gradients(run: VelocityRun) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's micro-batches of the step; returns the global batch's
    loss and its (saliency term, plain MSE) (zeros with plain MSE), the same on every rank."""
    vc, device, world = run.cfg.velocity, run.device, run.world
    run.opt.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    step_terms = torch.zeros(2, device=device)
    distributed.seed_step(run.cfg.seed, run.step, world)
    for i, n in enumerate(run.micro_sizes):
        x0, x1, t = _pair(run, next(run.batches))
        x_t = rf.interpolate(x0, x1, t)
        target = x1 - x0
        share = n / vc.train_batch_size  # of the global batch: DDP's mean over ranks is the batch mean
        with distributed.no_sync(run.ddp, last=i == len(run.micro_sizes) - 1):  # the saliency jvp stays per rank
            with run.autocast:
                v = run.ddp(x_t, t)
            v = v.float()
            if run.use_saliency:
                loss, term_sal, term_mse = rf.anchored_saliency_loss_terms(run.h, x_t, target, v, run.mse_weight)
                step_terms += torch.stack([term_sal, term_mse]) * share
            else:
                loss = rf.velocity_mse_loss(v, target)
            (loss * share * world.size).backward()
        step_loss += loss.detach() * share
    summed = world.sum_(torch.cat([step_loss.view(1), step_terms]))  # the global batch's loss, on every rank
    return summed[0], summed[1:]


def apply_step(run: VelocityRun) -> None:
    """Clip, step the optimizer, update the EMA: the step is done."""
    if run.cfg.velocity.gradient_clip > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.velocity.gradient_clip)
    run.opt.step()
    run.ema.update(run.model)
    run.step += 1


class LossWindow:
    """The steps since the last log line: their mean loss and loss terms, and images per second."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.start = 0.0, 0, time.perf_counter()
        self.terms = torch.zeros(2)

    def add(self, loss: float, terms: torch.Tensor) -> None:
        self.loss += loss
        self.terms += terms.detach().cpu()
        self.steps += 1

    def metrics(self, run: VelocityRun, lr: float) -> dict:
        """A metrics.jsonl row: the window's means at `run.step`."""
        elapsed = time.perf_counter() - self.start
        images_per_step = run.cfg.velocity.train_batch_size
        metrics = {
            "step": run.step,
            "loss": self.loss / self.steps,
            "lr": lr,
            "images_per_s": self.steps * images_per_step / max(elapsed, 1e-9),
            "images": run.step * images_per_step,
        }
        if run.use_saliency:  # the anchored loss's two terms apart: loss = loss_saliency + mse_weight * loss_mse
            metrics["loss_saliency"], metrics["loss_mse"] = (self.terms / self.steps).tolist()
            if run.anchor is not None:  # the MSE weight the relative anchor used last
                metrics["mse_weight_effective"] = run.anchor.effective
        return metrics
