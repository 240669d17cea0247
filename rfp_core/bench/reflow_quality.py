"""`rfp bench reflow_quality`: reflow and one-step distillation on the quality benchmark's digits task.

Per seed: the 1-RF flow is a quality row (`rfp bench quality`'s config, default "mse"), trained
with `train_run`; `reflow_run` then solves the couplings of the first `PAIRS` training inputs
(RK4 x 16), trains the 2-RF flow on them and distils a one-step map from the 2-RF's couplings,
each with the 1-RF's optimizer budget. Every
model translates the task's held-out inputs at N = 1, 2 and 12 Euler steps (the distilled map at
N = 1 only) and is scored by the task's judges (trained afresh, as in `rfp bench quality`).

The acceptance of the "straight and fast" claim, checked on the means over seeds:
- straightness_ratio = S(1-RF) / S(2-RF) >= 5 (S on an RK4 x 16 path, 0 = straight);
- the distilled map at N = 1 within 10 % of 1-RF at N = 12 on content kept and transfer rate;
- speedup = seconds per image of 1-RF at N = 12 / distilled at N = 1 >= 8.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any

import torch

from rfp_core.bench import quality as Q
from rfp_core.bench import quality_tasks as QT

STEPS = (1, 2, 12)
TASK = "digits"
PAIRS = (256, None)  # couplings per reflow round (full, quick: every training input); RK4 x 16 each


def _score_fn(judges: dict, quick: bool, seed: int, device: torch.device):
    def score(_images_in: torch.Tensor, out: torch.Tensor) -> dict:
        with torch.enable_grad():  # the two-sample test trains a classifier; the steps table runs under no_grad
            s = Q.score(out.detach(), judges, quick, seed, device)
        return {k: s[k] for k in ("content_kept", "transfer_rate", "two_sample_acc", "edge_agreement")}

    return score


@torch.no_grad()
def _steps_rows(run_dir, judges: dict, quick: bool, seed: int, device: torch.device) -> list[dict]:
    """The steps table of 1-RF, 2-RF and distilled on the task's eval inputs, each row scored."""
    from rfp_core.flow import rf
    from rfp_core.flow.reflow import Solver
    from rfp_core.flow.reflow_metrics import steps_table
    from rfp_core.train.reflow_report import _models
    from rfp_core.train.reflow_run import RunPaths

    models = _models(RunPaths.of_run(run_dir), device)
    base = models[0][1]
    x = judges["inputs"].to(device)
    z0 = base.encode(x)
    solver = Solver()
    reference = rf.integrate(base.velocity, z0, solver.steps, sampler=solver.sampler)
    return steps_table(
        [m for m, _ in models],
        z0,
        steps=STEPS,
        reference=reference,
        score=_score_fn(judges, quick, seed, device),
        images_in=x,
        decode=base.decode,
        straightness_steps=solver.steps,
        straightness_sampler=solver.sampler,
    )


def _pick(rows: list[dict], model: str, steps: int) -> dict:
    return next(r for r in rows if r["model"] == model and r["steps"] == steps)


def acceptance(per_seed: list[list[dict]]) -> dict[str, Any]:
    """The three checks of the module docstring, on the means over seeds."""

    def mean(model: str, steps: int, key: str) -> float:
        vals = [float(_pick(rows, model, steps)[key]) for rows in per_seed]
        return sum(vals) / len(vals)

    s1, s2 = mean("1-RF", 12, "straightness"), mean("2-RF", 12, "straightness")
    out: dict[str, Any] = {"straightness_1rf": s1, "straightness_2rf": s2, "straightness_ratio": s1 / max(s2, 1e-12)}
    for key in ("content_kept", "transfer_rate"):
        ref, one = mean("1-RF", 12, key), mean("distilled", 1, key)
        out[f"{key}_1rf_n12"], out[f"{key}_distilled_n1"] = ref, one
        out[f"{key}_within_10pct"] = one >= 0.9 * ref
    out["speedup_n1_vs_n12"] = mean("1-RF", 12, "seconds_per_input") / max(
        mean("distilled", 1, "seconds_per_input"), 1e-12
    )
    out["passed"] = (
        out["straightness_ratio"] >= 5
        and out["content_kept_within_10pct"]
        and out["transfer_rate_within_10pct"]
        and out["speedup_n1_vs_n12"] >= 8
    )
    return out


def summary_rows(per_seed: list[list[dict]]) -> list[dict]:
    """Per (model, N): every numeric column as mean / std / min / max / n over seeds."""
    keys = [(r["model"], r["steps"]) for r in per_seed[0]]
    out = []
    for model, steps in keys:
        picked = [_pick(rows, model, steps) for rows in per_seed]
        cols = [k for k, v in picked[0].items() if isinstance(v, (int, float)) and k != "steps"]
        out.append({"model": model, "steps": steps, **{k: Q.summarise([p.get(k) for p in picked]) for k in cols}})
    return out


def markdown(summary: list[dict], verdict: dict, header: dict) -> str:
    cols = ("content_kept", "transfer_rate", "two_sample_acc", "straightness", "mse_to_reference", "seconds_per_input")
    lines = [
        f"`{header['command']}` — {header['date']}, {header['platform']}, {header['seeds']} seeds, "
        f"1-RF row `{header['row']}` at {header['steps']} optimizer steps, batch {header['batch']}, "
        f"{header['size']} px; mean ± std over seeds.",
        "",
        "| model | N | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 2),
    ]
    for r in summary:
        cells = []
        for c in cols:
            s = r.get(c)
            cells.append("—" if not s or s["mean"] is None else f"{s['mean']:.4g} ± {s['std']:.2g}")
        lines.append(f"| {r['model']} | {r['steps']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Checks (means over seeds): "
        + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in verdict.items()),
        "",
    ]
    return "\n".join(lines)


def run(
    quick: bool = False,
    device: str | None = None,
    seeds: int | None = None,
    rows: str | None = None,
    steps: int | None = None,
) -> dict:
    """Every seed: 1-RF, reflow, distil, the scored steps table; the summary table in docs/ (not with --quick)."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.bench.ablation import splice_benchmarks
    from rfp_core.config import ConfigError
    from rfp_core.device import pick_device
    from rfp_core.paths import project_root, rfp_home
    from rfp_core.train.reflow_run import reflow_run

    start = time.perf_counter()
    dev = pick_device(device)
    row = rows or "mse"
    if row not in Q.ROW_CONFIGS:
        raise ConfigError(f"--rows {row}: the 1-RF row is one of {', '.join(Q.ROW_CONFIGS)}")
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    task = QT.make_task(
        TASK, rfp_home() / "bench" / "quality" / ("quick" if quick else "full") / TASK, QT.QUICK if quick else QT.FULL
    )
    judges = Q.train_judges(task, quick, dev)
    shared: dict = {}
    per_seed = []
    for seed in range(n_seeds):
        run_dir, _ = Q.train_row(task, row, seed, quick, dev, steps, shared)
        reflow_run(run_dir, rounds=1, distill=True, pairs=PAIRS[int(quick)], device=dev, progress=not quick)
        per_seed.append(_steps_rows(run_dir, judges, quick, seed, dev))
        print(f"reflow_quality seed {seed}: " + json.dumps(acceptance(per_seed[-1:])), file=sys.stderr)
    example = Q.row_config(row, 0, quick, steps)
    header = {
        "command": "rfp bench reflow_quality"
        + (" --quick" if quick else "")
        + f" --seeds {n_seeds} --rows {row}"
        + (f" --steps {steps}" if steps else ""),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": n_seeds,
        "platform": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {dev}",
        "row": row,
        "steps": example.velocity.total_steps,
        "batch": example.velocity.train_batch_size,
        "size": example.max_size,
    }
    summary, verdict = summary_rows(per_seed), acceptance(per_seed)
    table = markdown(summary, verdict, header)
    out_dir = rfp_home() / "bench" / "reflow_quality" if quick else project_root() / "docs"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / "reflow_quality.json",
        json.dumps({"header": header, "per_seed": per_seed, "summary": summary, "checks": verdict}, indent=1) + "\n",
    )
    if not quick:
        splice_benchmarks(
            project_root() / "docs" / "BENCHMARKS.md",
            table,
            begin=BEGIN,
            end=END,
            title="## Reflow and one step on the digits task — `rfp bench reflow_quality`",
        )
    print(table, file=sys.stderr)
    return json.loads(
        json.dumps(
            {
                "checks": verdict,
                "summary": summary,
                "seeds": n_seeds,
                "row": row,
                "seconds": time.perf_counter() - start,
            },
            default=str,
        )
    )


BEGIN, END = "<!-- reflow-quality:start -->", "<!-- reflow-quality:end -->"
