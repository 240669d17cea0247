"""`rfp bench quality`: does a translation change the style AND keep what the picture shows?

On tasks of real images (`quality_tasks`: digits -> MNIST-M-style textured digits; photo patches ->
a painterly look; digits_heldout: the digits task with textures no setting was chosen on;
digits_paired: the digits task with true same-name pairs), every row
(`quality_configs`) is trained with `train_run` for each seed, translates the held-out domain-0
inputs with `Translator.from_run` (`quality_rows`), and is scored by judges trained afresh on
held-out labelled real images (never on the model's nets; `quality_judges`):

- content_kept: a content CNN trained on labelled target-domain images reads each translation's
  label, scored against the input's true label (its ceiling: its accuracy on real target images);
- transfer_rate: the share of translations a domain judge (trained on real images) calls domain 1;
- two_sample_acc: a classifier two-sample test, real target images vs the translations
  (0.5 = indistinguishable, 1.0 = trivially told apart);
- fd / kid in the domain judge's feature space (its conv blocks' channel statistics);
- edge_agreement: correlation of input and output edge maps (content, label-free);
- straightness, nfe, wall_s (training + translation, seconds).

Two reference rows need no training and show the judges are not lenient: "identity" (the
untranslated inputs) and "tint" (a flat colour wash: each input's channels mapped to the target
domain's mean and spread). Raw results, grids and the table go to `$RFP_HOME/bench/quality/`
as the rows finish; a full run hands them to `rfp bench` for docs/quality and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rfp_core.bench import quality_tasks as QT
from rfp_core.bench import report
from rfp_core.bench.quality_configs import REFERENCE_ROWS, ROW_CONFIGS, ROWS, row_config, task_rows
from rfp_core.bench.quality_judges import channel_stats, score, train_judges
from rfp_core.bench.quality_report import markdown, summarise
from rfp_core.bench.quality_rows import row_outputs
from rfp_core.train.saliency import SaliencyThresholdNotReached

BEGIN, END = "<!-- quality:start -->", "<!-- quality:end -->"
TITLE = "## Translation quality on real images — `rfp bench quality`"


def _parse_list(value: str | list[str] | tuple[str, ...] | None, allowed: tuple[str, ...], what: str) -> list[str]:
    from rfp_core.config import ConfigError

    if value is None:
        return list(allowed)
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ConfigError(f"--{what}: unknown {', '.join(bad) or '(empty)'}; choose from {','.join(allowed)}")
    return items


def plan_rows(task_names: list[str], row_names: list[str]) -> dict[str, list[str]]:
    """Each task's rows: the asked-for rows that run on it (paired rows on paired tasks only)."""
    from rfp_core.config import ConfigError

    plan = {name: task_rows(row_names, QT.is_paired(name)) for name in task_names}
    for name, rows in plan.items():
        if not rows:
            fit = task_rows(list(ROWS), QT.is_paired(name))
            raise ConfigError(f"--rows {','.join(row_names)}: none runs on task {name}; its rows are {','.join(fit)}")
    return plan


def _score_row(
    task: QT.Task, row: str, seed: int, quick: bool, device, steps, judges: dict, ctx: dict
) -> tuple[dict, torch.Tensor | None]:
    """One row x seed scored, and its translations; a trained row that failed is a result too (its error)."""
    try:
        out, flow_stats, wall = row_outputs(task, row, seed, quick, device, steps, ctx)
    except SaliencyThresholdNotReached as exc:  # a failed row is a result, not the end of the run
        print(f"{task.name}/{row}/seed {seed}: {exc}", file=sys.stderr)
        return {"seed": seed, "error": str(exc)[:300]}, None
    res = {"seed": seed, **score(out, judges, quick, seed, device), **flow_stats, "wall_s": wall}
    print(
        f"{task.name}/{row}/seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float)),
        file=sys.stderr,
    )
    return res, out


def run_task(
    name: str,
    rows: list[str],
    seeds: list[int],
    quick: bool,
    device: torch.device,
    steps: int | None,
    grid_dir: Path,
    save: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Judges once, then every row x seed: train (trained rows), translate, score. Per-seed results;
    `save` gets the results so far after every row and seed (a run stopped early keeps them)."""
    from rfp_core.media.images import save_grid

    task = QT.bench_task(name, quick)
    t0 = time.perf_counter()
    judges = train_judges(task, quick, device)
    print(f"{name}: judges trained in {time.perf_counter() - t0:.0f} s; ceilings {judges['ceilings']}", file=sys.stderr)
    x = judges["inputs"]
    stats = channel_stats(task.load("train0", 0)[0]), channel_stats(task.load("train1", 1)[0])
    ctx: dict[str, Any] = {"inputs": x, "stats": stats, "shared": {}}
    per_row: dict[str, list[dict]] = {r: [] for r in rows}
    grids: dict[str, str] = {}
    result = {
        "rows": per_row,
        "ceilings": judges["ceilings"],
        "grids": grids,
        "n_eval": judges["n_eval"],
        "n_judge": judges["n_judge"],
        "style": task.style,
        "labels": list(task.label_names),
    }
    for seed in seeds:
        for row in rows:
            if row in REFERENCE_ROWS and seed != seeds[0]:
                continue  # no training, the same outputs every seed: scored once
            res, out = _score_row(task, row, seed, quick, device, steps, judges, ctx)
            per_row[row].append(res)
            if out is None:
                continue
            if row not in grids:  # the first seed's outputs: inputs above, outputs below
                grids[row] = str(save_grid([x[:8], out[:8].clamp(-1, 1)], grid_dir / f"{name}_{row}.png"))
            if save is not None:
                save(result)
    return result


def _header(quick: bool, dev, n_seeds: int, task_names: list[str], row_names: list[str], steps) -> dict:
    example = row_config(next((r for r in row_names if r in ROW_CONFIGS), "paper"), 0, quick, steps)
    return {
        "quick": quick,
        "date": report.today(),
        "device": str(dev),
        "seeds": n_seeds,
        "platform": report.platform_line(),
        "steps": example.velocity.total_steps,
        "batch": example.velocity.train_batch_size,
        "size": example.max_size,
        "model_channels": example.velocity.net.model_channels,
        "ch_mult": example.velocity.net.ch_mult,
        "nfe": example.velocity.num_inference_steps,
        "sampler": example.velocity.sampler,
        "anchor": ROW_CONFIGS["anchored"]["velocity"]["mse_weight"],
        "minutes": 0.0,
        "command": report.command(
            "quality", quick, seeds=n_seeds, tasks=",".join(task_names), rows=",".join(row_names), steps=steps or None
        ),
    }


def collect(out_dir: Path) -> dict[str, dict]:
    """Every task's raw results in `out_dir`, in the tasks' order (this run's and earlier runs')."""
    found = {}
    for name in QT.TASKS:
        try:
            found[name] = json.loads((out_dir / f"{name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return found


def _raw(header: dict, res: dict) -> str:
    return json.dumps({"header": header, **res}, indent=1, default=str) + "\n"


def docs_update(work: Path, task_names: list[str], docs_dir: Path) -> report.Docs:
    """This run's raw files, grids and table as docs/quality/ holds them (grids linked there), the
    tasks of earlier runs already in docs/quality kept in the table."""
    docs = report.Docs()
    mine = {name: res for name, res in collect(work).items() if name in task_names}
    for name, res in mine.items():
        for row, path in res["grids"].items():
            docs.copies[f"quality/{Path(path).name}"] = Path(path)
            res["grids"][row] = str(docs_dir / "quality" / Path(path).name)
        docs.files[f"quality/{name}.json"] = json.dumps(res, indent=1, default=str) + "\n"
    merged = {**collect(docs_dir / "quality"), **mine}
    table = markdown({n: merged[n] for n in QT.TASKS if n in merged}, docs_dir / "quality", False)
    docs.files["quality/QUALITY.md"] = table
    docs.sections.append(report.Section(BEGIN, END, TITLE, table))
    return docs


def _summary(results: dict[str, dict]) -> dict[str, Any]:
    return {
        name: {
            "ceilings": res["ceilings"],
            **{
                row: {m: summarise([r.get(m) for r in per_seed]) for m in ("content_kept", "transfer_rate")}
                for row, per_seed in res["rows"].items()
            },
        }
        for name, res in results.items()
    }


def run(
    quick: bool = False,
    device: str | None = None,
    seeds: int | None = None,
    tasks: str | None = None,
    rows: str | None = None,
    steps: int | None = None,
) -> dict:
    """Every task x row x seed; writes the grids, the raw JSON and the table under $RFP_HOME; returns the
    summary (a full run: with the docs to publish under "docs")."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.device import pick_device
    from rfp_core.paths import project_root, rfp_home

    start = time.perf_counter()
    dev = pick_device(device)
    task_names = _parse_list(tasks, tuple(QT.TASKS), "tasks")
    row_names = _parse_list(rows, ROWS, "rows")
    n_seeds = report.n_seeds(seeds, quick)
    plan = plan_rows(task_names, row_names)
    # a full run's work files sit apart from a quick run's; only `rfp bench` writes docs/
    work = rfp_home() / "bench" / "quality" / ("report" if quick else "report-full")
    work.mkdir(parents=True, exist_ok=True)
    header = _header(quick, dev, n_seeds, task_names, row_names, steps)

    def save(name: str, res: dict) -> None:
        # one raw file per task (runs of one task each can share the folder); the table from all of them
        atomic_write_text(work / f"{name}.json", _raw({**header, "minutes": (time.perf_counter() - start) / 60.0}, res))
        atomic_write_text(work / "QUALITY.md", markdown(collect(work), work, quick))

    results = {
        name: run_task(
            name, plan[name], list(range(n_seeds)), quick, dev, steps, work, save=lambda res, name=name: save(name, res)
        )
        for name in task_names
    }
    out_dir = work if quick else project_root() / "docs" / "quality"
    print(f"quality table: {out_dir / 'QUALITY.md'}; raw: {out_dir}/<task>.json", file=sys.stderr)
    summary: dict[str, Any] = _summary(results)
    summary.update(
        quick=quick,
        seeds=n_seeds,
        device=str(dev),
        seconds=time.perf_counter() - start,
        raw=[str(out_dir / f"{name}.json") for name in results],
    )
    summary = report.jsonable(summary)
    if not quick:
        summary[report.DOCS_KEY] = docs_update(work, task_names, project_root() / "docs")
    return summary
