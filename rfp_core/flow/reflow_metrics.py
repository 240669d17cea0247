"""Straightness and step count as first-class metrics: one table for 1-RF, k-RF and distilled.

Each model is evaluated at N = 1, 2, 4, 12 Euler steps (a distilled map only at N = 1, it has no
path): time per input, the distance to a reference output (e.g. the 1-RF's accurate ODE solve,
what reflow and distillation try to reproduce in fewer steps) and whatever a `score(images_in,
images_out) -> dict` callable reports (the quality benchmark's content / transfer judges).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rfp_core.flow import rf

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], dict]
DEFAULT_STEPS = (1, 2, 4, 12)


@dataclass
class FlowModel:
    name: str
    velocity: rf.VelocityFn
    one_step_only: bool = False  # a distilled map: only N = 1 is meaningful


def order_flip_fraction(z0: Tensor, z1: Tensor, axis: int = 0, max_pairs: int = 200_000, seed: int = 0) -> float:
    """Fraction of pairs (i, j) whose order along coordinate `axis` differs between z0 and z1.

    A proxy for crossing couplings: straight segments z0_i -> z1_i and z0_j -> z1_j whose order
    flips must pass each other. Independent couplings give about 0.5; a monotone (non-crossing)
    map gives 0. Pairs are sampled when there are more than `max_pairs`."""
    a, b = z0.reshape(len(z0), -1)[:, axis].double(), z1.reshape(len(z1), -1)[:, axis].double()
    n = len(a)
    if n < 2:
        raise ValueError("order_flip_fraction needs at least two pairs")
    if n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
    else:
        g = torch.Generator().manual_seed(seed)
        i, j = torch.randint(n, (max_pairs,), generator=g), torch.randint(n, (max_pairs,), generator=g)
        keep = i != j
        i, j = i[keep], j[keep]
    flips = torch.sign(a[i] - a[j]) * torch.sign(b[i] - b[j]) < 0
    return float(flips.double().mean())


def _timed(fn: Callable[[], Tensor], n: int) -> tuple[Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) / max(1, n)


def steps_table(
    models: Sequence[FlowModel],
    z0: Tensor,
    steps: Sequence[int] = DEFAULT_STEPS,
    reference: Tensor | None = None,
    score: ScoreFn | None = None,
    images_in: Tensor | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    straightness_steps: int = 16,
    sampler: rf.Sampler = "euler",
    straightness_sampler: rf.Sampler = "rk4",
) -> list[dict]:
    """One row per (model, N): straightness S of the model, seconds per input, MSE to `reference`,
    plus `score(images_in, decode(z_N))`'s keys. `decode` maps model space to images (identity
    when None); `images_in` defaults to `decode(z0)`."""
    decode = decode or (lambda z: z)
    images_in = images_in if images_in is not None else decode(z0)
    rows = []
    for m in models:
        s = (
            float("nan")
            if m.one_step_only
            else rf.straightness(m.velocity, z0, straightness_steps, sampler=straightness_sampler)
        )
        for n in steps:
            if m.one_step_only and n != 1:
                continue
            out, per = _timed(lambda m=m, n=n: rf.integrate(m.velocity, z0, n, sampler=sampler), len(z0))
            row = {
                "model": m.name,
                "steps": int(n),
                "nfe": rf.nfe(sampler, n),
                "straightness": s,
                "seconds_per_input": per,
            }
            if reference is not None:
                row["mse_to_reference"] = float((out.float() - reference.float()).pow(2).mean())
            if score is not None:
                row.update({k: float(v) for k, v in score(images_in, decode(out)).items()})
            rows.append(row)
    return rows


def _cell(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """The rows as one markdown table (columns in first-seen order)."""
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c, float("nan"))) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
