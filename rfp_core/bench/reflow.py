"""A 2-D toy for reflow: two Gaussians on the left -> two Gaussians on the right.

With the independent coupling half the straight lines go top-left -> bottom-right and cross the
other half, so 1-RF's paths bend (straightness > 0) and one Euler step lands near the mean.
Reflow on 1-RF's own ODE couplings straightens them; distillation makes one step accurate.
Used by the tests and by `rfp bench reflow [--quick]` (the last line is one JSON object).
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

from rfp_core.flow import rf
from rfp_core.flow.reflow import Solver, generate_couplings, tensor_source
from rfp_core.flow.reflow_metrics import FlowModel, markdown_table, order_flip_fraction, steps_table
from rfp_core.train.reflow import FitSettings, coupling_batches, fit

Tensor = torch.Tensor


class ToyVelocity(nn.Module):
    """v(x, t) for 2-D points: an MLP on (x, t)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], dim=1))


def two_gaussians(n: int, x: float, seed: int, spread: float = 2.0, sigma: float = 0.3) -> Tensor:
    """n points, half around (x, +spread), half around (x, -spread)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    centre = torch.stack([torch.full((n,), x), spread * sign], dim=1)
    return centre + sigma * torch.randn(n, 2, generator=g)


def independent_batches(batch: int, seed: int):
    """1-RF's coupling: a fresh independent (z0, z1) draw per step."""

    def draw(step: int) -> tuple[Tensor, Tensor]:
        s = seed * 7919 + step * 2
        return two_gaussians(batch, -3.0, s), two_gaussians(batch, 3.0, s + 1)

    return draw


def toy_settings(steps: int, distill: bool = False) -> FitSettings:
    return FitSettings(
        steps=steps,
        batch_size=256,
        minibatch_size=256,
        learning_rate=3e-3,
        ema=0.0,
        timestep_sampling="uniform",
        loss="mse",
        seed=0,
        distill=distill,
    )


def run_toy(
    steps_1rf: int = 400,
    steps_reflow: int = 400,
    steps_distill: int = 400,
    pairs: int = 2048,
    seed: int = 0,
    root=None,
    progress: bool = False,
) -> dict:
    """Train 1-RF, one reflow round (2-RF) and a distilled map; return the measurements."""
    torch.manual_seed(seed)
    one = fit(
        ToyVelocity(), independent_batches(256, seed), toy_settings(steps_1rf), progress=progress, desc="1-RF"
    ).model
    z0 = two_gaussians(pairs, -3.0, seed + 10_000)
    solver = Solver("rk4", 32)
    c1 = generate_couplings(
        one, tensor_source(z0, "toy"), "toy-1rf", solver, shard_size=512, root=root, progress=progress
    )
    a, b = c1.load()
    two_init = ToyVelocity()
    two_init.load_state_dict(one.state_dict())
    two = fit(
        two_init, coupling_batches(a, b, 256, seed), toy_settings(steps_reflow), progress=progress, desc="2-RF"
    ).model
    dist_init = ToyVelocity()
    dist_init.load_state_dict(one.state_dict())
    dist = fit(
        dist_init,
        coupling_batches(a, b, 256, seed),
        toy_settings(steps_distill, distill=True),
        progress=progress,
        desc="distill",
    ).model

    test = two_gaussians(512, -3.0, seed + 20_000)
    ref = rf.integrate(one, test, 64, sampler="rk4")
    z1_two = rf.integrate(two, test, 64, sampler="rk4")
    rows = steps_table(
        [FlowModel("1-RF", one), FlowModel("2-RF", two), FlowModel("1-RF+distill", dist, one_step_only=True)],
        test,
        reference=ref,
    )
    indep = two_gaussians(512, 3.0, seed + 30_000)
    return {
        "straightness_1rf": rf.straightness(one, test, 32, sampler="rk4"),
        "straightness_2rf": rf.straightness(two, test, 32, sampler="rk4"),
        "order_flips_independent": order_flip_fraction(test, indep, axis=1),
        "order_flips_1rf_coupling": order_flip_fraction(test, ref, axis=1),
        "order_flips_2rf_coupling": order_flip_fraction(test, z1_two, axis=1),
        "rows": rows,
        "models": {"1rf": one, "2rf": two, "distilled": dist},
        "test": test,
        "reference": ref,
    }


def run(quick: bool = False, device: str | None = None) -> dict:
    """`rfp bench reflow`: the toy's straightness, order flips and steps table (CPU; `device` unused)."""
    start = time.perf_counter()
    steps = 150 if quick else 400
    out = run_toy(steps, steps, steps, pairs=1024 if quick else 2048, progress=not quick)
    for key in ("models", "test", "reference"):
        out.pop(key)
    print(markdown_table(out["rows"]), file=sys.stderr)
    # strict JSON: a distilled map has no straightness (NaN) -> null
    out["rows"] = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in out["rows"]
    ]
    out["seconds"] = time.perf_counter() - start
    out["benchmark"] = "reflow-toy-2d"
    return out


if __name__ == "__main__":
    from rfp_core.bench import emit

    emit(run())
