"""The reflow report of a run: straightness and the steps table for 1-RF, every k-RF, distilled.

Inputs are held out from the couplings (held-out domain-0 frames, or noise with another seed);
the reference is 1-RF's accurate ODE solve, what the fewer-step models try to reproduce.
"""

from __future__ import annotations

import json

import torch

from rfp_core.atomic import atomic_write_text
from rfp_core.flow import rf
from rfp_core.flow.reflow import Solver
from rfp_core.flow.reflow_metrics import FlowModel, ScoreFn, markdown_table, steps_table


def _models(paths, device) -> list[tuple[FlowModel, object]]:
    from rfp_core.inference.translate import Translator

    run = paths.out
    found = [(paths.base, "1-RF", False)]
    flows = sorted(
        (p for p in run.glob("reflow_*/velocity.pt") if p.parent.name.split("_")[-1].isdigit()),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    found += [(p, f"{int(p.parent.name.split('_')[-1]) + 1}-RF", False) for p in flows]
    if (run / "distilled" / "velocity.pt").is_file():
        found.append((run / "distilled" / "velocity.pt", "distilled", True))
    out = []
    for path, name, one in found:
        tr = Translator.from_run(path, device=device)
        out.append((FlowModel(name, tr.velocity, one_step_only=one), tr))
    return out


def _inputs(paths, tr, n: int) -> torch.Tensor:
    """Images in [-1, 1] (translation) or latent noise (generative) not used for the couplings."""
    cfg = tr.cfg
    if cfg.generative:
        side = cfg.max_size // tr.codec.downsample
        g = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        return torch.randn(n, tr.codec.latent_channels, side, side, generator=g)
    from rfp_core.media.datasets import FrameDataset
    from rfp_core.media.frame_store import FrameStore

    store = paths.store if paths.store is not None else FrameStore(max_side=cfg.store_max_side)
    for split in ("holdout", "all"):
        try:
            ds = FrameDataset(
                paths.manifest,
                store,
                0,
                cfg.max_size,
                split=split,
                holdout_fraction=cfg.saliency.holdout_fraction,
                train_crop=False,
            )
        except ValueError:
            continue
        return torch.stack([ds[i] for i in range(min(n, len(ds)))])
    raise ValueError(f"{paths.manifest}: no domain-0 frames to report on")


@torch.no_grad()
def reflow_rows(
    run, device=None, n: int = 32, score: ScoreFn | None = None, solver: Solver | None = None
) -> list[dict]:
    """The steps table; `solver` (default rk4 x 16, as the couplings) solves the reference and the
    paths whose straightness is reported."""
    from rfp_core.device import pick_device
    from rfp_core.train.reflow_run import RunPaths

    paths = run if isinstance(run, RunPaths) else RunPaths.of_run(run)
    device, solver = pick_device(device), solver or Solver()
    models = _models(paths, device)
    base = models[0][1]
    x = _inputs(paths, base, n).to(device)
    z0 = x if base.cfg.generative else base.start(x)
    reference = rf.integrate(base.velocity, z0, solver.steps, sampler=solver.sampler)
    images_in = None if base.cfg.generative else x
    return steps_table(
        [m for m, _ in models],
        z0,
        reference=reference,
        score=score,
        images_in=images_in,
        decode=base.decode,
        straightness_steps=solver.steps,
        straightness_sampler=solver.sampler,
    )


def write_report(run, device=None, n: int = 32, score: ScoreFn | None = None, solver: Solver | None = None) -> str:
    """Write `reflow_report.md` and `.json` beside the products (a run folder or RunPaths); returns the markdown."""
    from rfp_core.train.reflow_run import RunPaths

    paths = run if isinstance(run, RunPaths) else RunPaths.of_run(run)
    solver = solver or Solver()
    rows = reflow_rows(paths, device=device, n=n, score=score, solver=solver)
    md = (
        f"Reflow report for {paths.out.name}: up to {n} held-out inputs, Euler steps; mse_to_reference is to 1-RF's "
        f"{solver.sampler} x {solver.steps} solve (model space); straightness S of each flow on its "
        f"{solver.sampler} x {solver.steps} path (0 = straight).\n\n" + markdown_table(rows) + "\n"
    )
    atomic_write_text(paths.out / "reflow_report.md", md)
    atomic_write_text(paths.out / "reflow_report.json", json.dumps(rows, indent=2) + "\n")
    return md
