"""One row of `rfp bench quality` on one task and seed: its translations of the task's eval inputs.

Reference rows need no training ("identity": the inputs; "tint": a colour wash); trained rows are a
`train_run` of the row's config (in paired mode for a paired row) into
`$RFP_HOME/runs/quality-<task>-<row>-s<seed>[-quick]`, reused when a finished run of exactly that
config is there, then translated with `Translator.from_run`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from rfp_core.bench import quality_tasks as QT
from rfp_core.bench.quality_configs import row_config, row_pairing
from rfp_core.bench.quality_judges import tint
from rfp_core.bench.reuse import comparable, train_once

MARKER = "quality.json"


def _saliency_key(cfg) -> tuple:
    return json.dumps(cfg.saliency.model_dump(mode="json"), sort_keys=True), cfg.seed, cfg.max_size


def _share_saliency(cfg, run_dir: Path, done: dict[tuple, Path]) -> None:
    """Rows with the same saliency settings, seed and data train the same phase-1 net: copy a
    finished one into this run folder, and `train_saliency` sees it is done and skips it."""
    if not cfg.needs_saliency:
        return
    key = _saliency_key(cfg)
    src = done.get(key)
    if src is not None and (src / "saliency.pt").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("saliency.pt", "saliency_state.json"):
            shutil.copyfile(src / name, run_dir / name)
    done.setdefault(key, run_dir)


def train_row(
    task: QT.Task, row: str, seed: int, quick: bool, device: torch.device, steps: int | None, shared: dict[tuple, Path]
) -> tuple[Path, float]:
    """(run folder, training seconds) of one trained row; `shared` maps saliency settings to a run
    that trained them (filled as rows train)."""
    from rfp_core.paths import runs_dir
    from rfp_core.train.run import train_run

    cfg = row_config(row, seed, quick, steps)
    pairing = row_pairing(row)
    run_id = f"quality-{task.name}-{row}-s{seed}" + ("-quick" if quick else "")
    run_dir = runs_dir() / run_id
    # the marker of an unpaired run stays as it was (no "pairing" key), so earlier runs are reused
    expect = {"config": comparable(cfg), **({"pairing": pairing} if pairing != "unpaired" else {})}
    seconds, reused = train_once(
        run_dir,
        MARKER,
        expect,
        lambda: train_run(
            cfg,
            [task.folder("train0", 0)],
            [task.folder("train1", 1)],
            run_id=run_id,
            device=device,
            progress=False,
            paired=pairing == "filenames",
        ),
        note="re-scoring it",
        prepare=lambda: _share_saliency(cfg, run_dir, shared),
    )
    if reused:
        shared.setdefault(_saliency_key(cfg), run_dir)
    return run_dir, seconds


@torch.no_grad()
def translate_all(
    run_dir: Path, x: torch.Tensor, device: torch.device, sigma: float | None = None, batch: int = 64
) -> tuple[torch.Tensor, dict]:
    """The run's translations of `x` (from source noise σ `sigma`, None: the run's own), the flow's
    straightness on its first batch and its NFE: velocity-net calls per image, retries included."""
    from rfp_core.flow import rf
    from rfp_core.inference.translate import Translator

    tr = Translator.from_run(run_dir, device)
    if sigma is not None:
        tr.set_translate_noise(sigma)
    steps, sampler = tr.cfg.velocity.num_inference_steps, tr.cfg.velocity.sampler
    out = torch.cat([tr.translate(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])
    nfe = tr.flow_evaluations / max(len(x), 1)
    z0 = tr.start(x[:batch].to(device))
    return out, {"straightness": rf.straightness(tr.velocity, z0, steps, sampler), "nfe": nfe}


def row_outputs(
    task: QT.Task, row: str, seed: int, quick: bool, device: torch.device, steps: int | None, ctx: dict
) -> tuple[torch.Tensor, dict, float]:
    """(translations of the eval inputs, flow stats, wall seconds: training + translation) of one row.

    `ctx`: the task's eval inputs ("inputs"), its two domains' colour stats ("stats") and the
    shared saliency runs ("shared"). A trained row that fails raises (SaliencyThresholdNotReached)."""
    x = ctx["inputs"]
    t0 = time.perf_counter()
    if row == "identity":
        return x.clone(), {"straightness": None, "nfe": 0}, time.perf_counter() - t0
    if row == "tint":
        return tint(x, *ctx["stats"]), {"straightness": None, "nfe": 0}, time.perf_counter() - t0
    run_dir, train_s = train_row(task, row, seed, quick, device, steps, ctx["shared"])
    t0 = time.perf_counter()  # the training is counted once: its own (or its reused run's) seconds
    sigma = row_config(row, seed, quick, steps).velocity.translate_sigma  # the row's, not the reused run's
    out, flow_stats = translate_all(run_dir, x, device, sigma)
    return out, flow_stats, train_s + (time.perf_counter() - t0)
