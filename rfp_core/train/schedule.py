"""When things happen in a training loop: the learning rate as a pure function of the step (so
resuming needs no scheduler state) and when a resume checkpoint is due."""

from __future__ import annotations

import math
import time

import torch


def lr_at(step: int, total_steps: int, base_lr: float, kind: str = "constant", warmup_fraction: float = 0.0) -> float:
    """Linear warm-up over `warmup_fraction` of the steps, then constant or cosine decay to zero."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    if kind == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr_schedule {kind!r}; use 'constant' or 'cosine'")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class CheckpointClock:
    """A resume checkpoint is due every `every_steps` steps (None: never by steps) and once
    `every_s` seconds have passed since the last one (`reset` after writing it)."""

    def __init__(self, every_steps: int | None, every_s: float):
        self.every_steps, self.every_s = every_steps, every_s
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        return by_steps or time.monotonic() - self.last >= self.every_s
