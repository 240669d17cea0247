"""Exponential moving average of a model's weights; sampling and the final checkpoint use it."""

from __future__ import annotations

import copy

import torch
from torch import nn


def warmup_steps_for(decay: float, warmup_steps: int | None) -> int:
    """`velocity.ema_warmup_steps`, resolved: None = decay / (1 - decay), the first step at which a
    plain running mean of every update so far has the configured horizon 1 / (1 - decay)."""
    if warmup_steps is not None:
        return int(warmup_steps)
    return round(decay / (1.0 - decay)) if decay > 0 else 0


def horizon_note(decay: float, total_steps: int) -> str | None:
    """A warning when the EMA averages over more than half the run (its weights then carry the
    early, barely trained ones): None when the horizon fits."""
    if decay <= 0 or total_steps <= 0:
        return None
    horizon = 1.0 / (1.0 - decay)
    if horizon <= total_steps / 2:
        return None
    return (f"velocity.ema {decay} averages over ~{horizon:.0f} steps, more than half of this run's {total_steps}: "
            f"the EMA weights include early training; a decay of at most {1 - 2 / total_steps:.4g} fits this run")


class EMA:
    """Shadow weights, updated after every optimizer step with decay d_n (n = updates so far).

    Warm-up: the averaging horizon 1 / (1 - d_n) grows linearly from 1 at n = 0 to the configured
    1 / (1 - decay) at n = `warmup_steps`, so early weights are not over-counted; the default
    length (None) makes d_n = n / (n + 1), the running mean, until the configured decay is reached.
    `warmup_steps` 0 is the original trainer's constant decay from the first step."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int | None = None):
        self.decay = decay
        self.warmup_steps = warmup_steps_for(decay, warmup_steps)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        if self.decay <= 0 or self.updates >= self.warmup_steps:
            return self.decay
        horizon = 1.0 + self.updates * (1.0 / (1.0 - self.decay) - 1.0) / self.warmup_steps
        return min(self.decay, 1.0 - 1.0 / horizon)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
