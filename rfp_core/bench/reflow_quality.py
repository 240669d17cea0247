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

import hashlib
import json
import sys
import time
from typing import Any

import torch

from rfp_core.bench import quality_judges as QJ
from rfp_core.bench import quality_tasks as QT
from rfp_core.bench import report
from rfp_core.bench.quality_configs import ROW_CONFIGS, row_config, row_pairing
from rfp_core.bench.quality_report import summarise
from rfp_core.bench.quality_rows import train_row

STEPS = (1, 2, 12)
TASK = "digits"
PAIRS = (256, None)  # couplings per reflow round (full, quick: every training input); RK4 x 16 each


def _score_fn(judges: dict, quick: bool, seed: int, device: torch.device):
    def score(_images_in: torch.Tensor, out: torch.Tensor) -> dict:
        with torch.enable_grad():  # the two-sample test trains a classifier; the steps table runs under no_grad
            s = QJ.score(out.detach(), judges, quick, seed, device)
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
    z0 = base.start(x)
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
        out.append({"model": model, "steps": steps, **{k: summarise([p.get(k) for p in picked]) for k in cols}})
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


def _header(quick: bool, dev, n_seeds: int, row: str, steps: int | None) -> dict:
    example = row_config(row, 0, quick, steps)
    return {
        "command": report.command("reflow_quality", quick, seeds=n_seeds, rows=row, steps=steps or None),
        "date": report.today(),
        "seeds": n_seeds,
        "platform": f"{report.platform_line()}, {dev}",
        "row": row,
        "steps": example.velocity.total_steps,
        "batch": example.velocity.train_batch_size,
        "size": example.max_size,
    }


def _one_row(rows: str | None) -> str:
    from rfp_core.config import ConfigError

    row = rows or "mse"
    unpaired = [r for r in ROW_CONFIGS if row_pairing(r) == "unpaired"]  # the digits task does not pair
    if row not in unpaired:
        raise ConfigError(f"--rows {row}: the 1-RF row is one of {', '.join(unpaired)}")
    return row


def _seed(task, row: str, seed: int, quick: bool, dev, steps: int | None, shared: dict, judges: dict) -> list[dict]:
    """One seed's scored steps table: from the cache when this seed's config already finished."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.paths import rfp_home
    from rfp_core.train.reflow_run import reflow_run

    key = hashlib.sha1(
        json.dumps([row_config(row, seed, quick, steps).model_dump(mode="json"), PAIRS, STEPS]).encode()
    ).hexdigest()[:16]
    cached = rfp_home() / "bench" / "reflow_quality" / ("quick" if quick else "full") / f"seed{seed}-{row}-{key}.json"
    if cached.is_file():
        print(f"reflow_quality seed {seed}: scored rows reused from {cached}", file=sys.stderr)
        return json.loads(cached.read_text())
    run_dir, _ = train_row(task, row, seed, quick, dev, steps, shared)
    reflow_run(run_dir, rounds=1, distill=True, pairs=PAIRS[int(quick)], device=dev, progress=not quick)
    rows = _steps_rows(run_dir, judges, quick, seed, dev)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cached, json.dumps(rows, default=str))
    return rows


def run(
    quick: bool = False,
    device: str | None = None,
    seeds: int | None = None,
    rows: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
) -> dict:
    """Every seed: 1-RF, reflow, distil, the scored steps table; a full run's summary table for docs/.

    A seed's scored rows are cached under $RFP_HOME (keyed by its config), so a stopped run goes on
    where it stopped, and `seed=K` (`--seed K`) runs one seed alone: several processes or machines
    share one long run, and `--seeds N` then assembles the table from the cache."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.device import pick_device
    from rfp_core.paths import rfp_home

    start = time.perf_counter()
    dev = pick_device(device)
    row = _one_row(rows)
    n_seeds = report.n_seeds(seeds, quick)
    task = QT.bench_task(TASK, quick)
    judges = QJ.train_judges(task, quick, dev)
    shared: dict = {}
    per_seed = []
    for s in [seed] if seed is not None else range(n_seeds):
        per_seed.append(_seed(task, row, s, quick, dev, steps, shared, judges))
        print(f"reflow_quality seed {s}: " + json.dumps(acceptance(per_seed[-1:])), file=sys.stderr)
    if seed is not None:  # one seed of a split run: cached for the `--seeds N` run that assembles the table
        return report.jsonable({"seed": seed, "checks": acceptance(per_seed), "seconds": time.perf_counter() - start})
    header = _header(quick, dev, n_seeds, row, steps)
    summary, verdict = summary_rows(per_seed), acceptance(per_seed)
    table = markdown(summary, verdict, header)
    raw = json.dumps({"header": header, "per_seed": per_seed, "summary": summary, "checks": verdict}, indent=1) + "\n"
    if quick:
        out_dir = rfp_home() / "bench" / "reflow_quality"
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "reflow_quality.json", raw)
    print(table, file=sys.stderr)
    result = report.jsonable(
        {"checks": verdict, "summary": summary, "seeds": n_seeds, "row": row, "seconds": time.perf_counter() - start}
    )
    if not quick:
        result[report.DOCS_KEY] = report.Docs(
            files={"reflow_quality.json": raw}, sections=[report.Section(BEGIN, END, TITLE, table)]
        )
    return result


BEGIN, END = "<!-- reflow-quality:start -->", "<!-- reflow-quality:end -->"
TITLE = "## Reflow and one step on the digits task — `rfp bench reflow_quality`"
