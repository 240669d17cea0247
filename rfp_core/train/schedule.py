"""Learning-rate schedule as a pure function of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math


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
