"""Train a velocity on fixed couplings (z0, z1): k-RF (reflow) and one-step distillation.

Both fit v on pairs that are already coupled, so unlike phase 2 nothing is drawn at random
from two domains: a step's batch and timesteps are a pure function of (seed, step), which makes
resume exact with only model, EMA and optimizer state.

- reflow: straight-line loss on the coupling, x_t = t z1 + (1-t) z0, target z1 - z0 (MSE by
  default; the saliency-weighted loss, anchored or not, as options, as in 1-RF);
- distill: the net at t = 0 only, the one-step map z0 + v(z0, 0) fitted to z1 with L2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from rfp_core.checkpoint import load_checkpoint, save_checkpoint
from rfp_core.config import ModelConfig
from rfp_core.flow import rf
from rfp_core.train.ema import EMA
from rfp_core.train.schedule import lr_at

Tensor = torch.Tensor
BatchFn = Callable[[int], tuple[Tensor, Tensor]]  # step -> (z0, z1), a pure function of the step
Loss = Literal["mse", "saliency"]


def build_velocity_net(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """The velocity net of a run (UNet or DiT), built as rfp_core/train/velocity.py builds it."""
    from rfp_core.nets import build_velocity_net as build

    return build(cfg.velocity.net, in_channels=in_channels)


@dataclass(frozen=True)
class FitSettings:
    steps: int
    batch_size: int
    minibatch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    ema: float = 0.0
    timestep_sampling: Literal["uniform", "logit-normal"] = "uniform"
    loss: Loss = "mse"
    mse_weight: float = 0.0
    gradient_clip: float | None = None
    lr_schedule: str = "constant"
    warmup_fraction: float = 0.0
    seed: int = 0
    distill: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.minibatch_size < 1:
            raise ValueError(f"steps, batch_size and minibatch_size must be >= 1: {self}")
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of minibatch_size {self.minibatch_size}")

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, steps: int | None = None, loss: Loss = "mse", distill: bool = False
    ) -> "FitSettings":
        """The run's velocity settings (lr, batch, EMA, clip, schedule) with this task's loss and budget."""
        vc = cfg.velocity
        return cls(
            steps=int(steps or vc.total_steps),
            batch_size=vc.train_batch_size,
            minibatch_size=vc.train_minibatch_size,
            learning_rate=vc.learning_rate,
            weight_decay=vc.weight_decay,
            ema=vc.ema,
            timestep_sampling=vc.timestep_sampling,
            loss=loss,
            mse_weight=vc.mse_weight,
            gradient_clip=vc.gradient_clip,
            lr_schedule=vc.lr_schedule,
            warmup_fraction=vc.warmup_fraction,
            seed=cfg.seed,
            distill=distill,
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "FitSettings":
        return replace(self, **changes)


@dataclass
class FitResult:
    model: nn.Module  # the EMA weights (the product)
    final_loss: float
    steps: int
    losses: list[float]


def coupling_batches(z0: Tensor, z1: Tensor, batch_size: int, seed: int) -> BatchFn:
    """Batches drawn with replacement from stored couplings, seeded by (seed, step)."""
    if len(z0) != len(z1) or len(z0) == 0:
        raise ValueError(f"couplings must be non-empty and aligned, got {len(z0)} z0 and {len(z1)} z1")

    def batch(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + step)
        idx = torch.randint(len(z0), (batch_size,), generator=g)
        return z0[idx], z1[idx]

    return batch


def pair_loss(net: nn.Module, z0: Tensor, z1: Tensor, t: Tensor, settings: FitSettings, h=None) -> Tensor:
    """The loss of one minibatch of coupled pairs."""
    if settings.distill:
        v = net(z0, torch.zeros_like(t)).float()
        return rf.velocity_mse_loss(z0.float() + v, z1)  # the one-step map z0 + v(z0, 0) vs z1
    x_t = rf.interpolate(z0, z1, t)
    target = z1 - z0
    v = net(x_t, t).float()
    if settings.loss == "saliency":
        if h is None:
            raise ValueError("loss 'saliency' needs the run's saliency net (h); pass it, or use loss 'mse'")
        return rf.anchored_saliency_loss(h, x_t, target, v, settings.mse_weight)
    return rf.velocity_mse_loss(v, target)


def _resume(state_path: Path | None, fingerprint: dict, model: nn.Module, ema: EMA, opt) -> int:
    if state_path is None or not state_path.is_file():
        return 0
    state = load_checkpoint(state_path)
    if state.get("fingerprint") != fingerprint:
        return 0  # another budget or coupling: start over
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def fit(
    net: nn.Module,
    batches: BatchFn,
    settings: FitSettings,
    device: str | torch.device = "cpu",
    h=None,
    state_path: Path | None = None,
    fingerprint: dict | None = None,
    checkpoint_every: int | None = None,
    progress: bool = True,
    desc: str = "reflow",
) -> FitResult:
    """Train `net` (v(x, t) -> velocity) on `batches` for `settings.steps` optimizer steps.

    With `state_path`, a full state is written there every `checkpoint_every` steps and a rerun with
    the same `fingerprint` continues from it (batches and timesteps depend on the step only)."""
    device = torch.device(device)
    net = net.to(device).train().requires_grad_(True)
    ema = EMA(net, settings.ema)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    fingerprint = {"settings": settings.as_dict(), **(fingerprint or {})}
    step = _resume(state_path, fingerprint, net, ema, opt)
    chunks = settings.batch_size // settings.minibatch_size
    losses: list[float] = []
    bar = tqdm(total=settings.steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    while step < settings.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(
                step, settings.steps, settings.learning_rate, settings.lr_schedule, settings.warmup_fraction
            )
        z0, z1 = batches(step)
        g = torch.Generator().manual_seed(int(settings.seed) * 999_983 + step + 1)
        t = rf.sample_timesteps(len(z0), settings.timestep_sampling, generator=g)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for part in zip(z0.chunk(chunks), z1.chunk(chunks), t.chunk(chunks)):
            a, b, tt = (x.to(device) for x in part)
            loss = pair_loss(net, a, b, tt, settings, h)
            (loss / chunks).backward()
            total += float(loss.detach()) / chunks
        if not math.isfinite(total):
            raise FloatingPointError(
                f"{desc}: loss became {total} at step {step + 1}; lower the learning rate "
                f"({settings.learning_rate}) or set a gradient clip"
            )
        if settings.gradient_clip:  # None or 0 = off
            nn.utils.clip_grad_norm_(net.parameters(), settings.gradient_clip)
        opt.step()
        ema.update(net)
        step += 1
        losses.append(total)
        bar.update(1)
        if step % max(1, settings.steps // 50) == 0:
            bar.set_postfix(loss=f"{total:.4g}")
        if state_path is not None and checkpoint_every and (step % checkpoint_every == 0 or step == settings.steps):
            save_checkpoint(
                state_path,
                {
                    "model": net.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "fingerprint": fingerprint,
                },
            )
    bar.close()
    return FitResult(ema.model.eval().requires_grad_(False), losses[-1] if losses else float("nan"), step, losses)
