"""`rfp bench ablation`: the demo config trained with the saliency-weighted loss and with plain MSE.

The rows (`VARIANTS`, in order): "saliency" is the demo config as it is, MSE anchor
(`velocity.mse_weight`) included when it has one; "saliency, no MSE anchor" is the same with
`mse_weight` 0, a row only when the demo config's anchor is positive (else it would repeat the
first); "mse" is plain rectified flow. Same data and budget; rows differ only in
`velocity.loss` and `velocity.mse_weight`. Every row is trained once per seed (`--seeds`, default 3:
the training seed; the data are the same), every run graded by one judge (trained once on the
held-out real frames) and measured by `evaluate_run`; cells are mean ± std (min–max) over seeds.
A full run hands the table to `rfp bench` for docs/ABLATION.md and the ablation section of
docs/BENCHMARKS.md (a `--quick` smoke run writes it under $RFP_HOME instead, keeping the docs).
docs/METHOD.md predicts the trade-off: the saliency loss keeps the shapes (high mask IoU) but on its own
lets the background drift (a colour cast, which the anchor holds); MSE breaks the shapes.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rfp_core.bench import report
from rfp_core.bench.reuse import comparable, train_once
from rfp_core.config import ConfigError, ModelConfig
from rfp_core.config_files import config_from_dict, load_config
from rfp_core.paths import project_root, rfp_home, runs_dir


@dataclass(frozen=True)
class Variant:
    """One row of the table: its label, a slug for run ids and file names, and the config overrides."""

    label: str
    slug: str
    overrides: dict[str, Any] = field(default_factory=dict)


SALIENCY = Variant("saliency", "saliency", {"velocity": {"loss": "saliency"}})
NO_ANCHOR = Variant(
    "saliency, no MSE anchor", "saliency-no-anchor", {"velocity": {"loss": "saliency", "mse_weight": 0.0}}
)
MSE = Variant("mse", "mse", {"velocity": {"loss": "mse", "mse_weight": 0.0}})
VARIANTS = (SALIENCY, NO_ANCHOR, MSE)


def variants(base: ModelConfig) -> list[Variant]:
    """The rows for this base config, in order: the no-anchor row only when it has an anchor (else it
    would repeat the first row)."""
    return [v for v in VARIANTS if v is not NO_ANCHOR or base.velocity.mse_weight > 0]


COLUMNS = [
    ("transfer_rate", "transfer rate ↑", "{:.3f}"),
    ("mask_iou", "mask IoU ↑", "{:.3f}"),
    ("fid_judge", "FD (judge) ↓", "{:.2f}"),
    ("kid_judge", "KID (judge) ↓", "{:.3f}"),
    ("structure_similarity", "structure sim. ↑", "{:.3f}"),
    ("cycle_error", "cycle error ↓", "{:.3f}"),
    ("straightness", "straightness ↓", "{:.4f}"),
    ("nfe", "NFE", "{}"),
    ("ms_per_image", "ms / image", "{:.1f}"),
    ("train_seconds", "train s (all phases)", "{:.0f}"),
]


def demo_config() -> tuple[ModelConfig, str]:
    """configs/demo.json, and its name for the table's header."""
    path = project_root() / "configs" / "demo.json"
    if not path.exists():
        raise ConfigError(f"{path} is missing: the ablation varies the demo config; restore it from git")
    return load_config(path), "configs/demo.json"


def _encoder(cfg: ModelConfig, device: torch.device):
    from rfp_core.structure import ThumbnailEncoder, WeightsMissingError, build_encoder

    try:
        return build_encoder(cfg.structure, device)
    except WeightsMissingError:
        return ThumbnailEncoder(cfg.structure.thumbnail_size)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def _seeds_cell(per_seed: list[dict], key: str, fmt: str) -> str:
    from rfp_core.bench.quality_report import cell

    return cell([m.get(key) for m in per_seed], fmt.replace("{}", "{:.0f}"))


def markdown(rows: dict[str, list[dict]], header: dict[str, Any]) -> str:
    """The table: one line per row, each cell over the row's seeds (`rows`: label -> per-seed results)."""
    w = float(header.get("mse_weight") or 0.0)
    if w > 0:
        differ = (
            "rows differ only in `velocity.loss` and `velocity.mse_weight` "
            f"(the MSE anchor weight, {w:g} in the demo config)"
        )
        saliency_row = (
            f"The `{SALIENCY.label}` row is the demo config as it is: the saliency-weighted loss plus "
            f"the MSE anchor of weight {w:g}."
        )
        parts = (
            f"The rows show what each part does: `{SALIENCY.label}` against `{NO_ANCHOR.label}` is the "
            f"anchor alone, `{NO_ANCHOR.label}` against `{MSE.label}` the saliency weighting alone."
        )
    else:
        differ = "rows differ only in `velocity.loss` (the demo config has no MSE anchor: `velocity.mse_weight` 0)"
        saliency_row = f"The `{SALIENCY.label}` row is the demo config as it is (no MSE anchor)."
        parts = "The rows show what the saliency weighting does."
    lines = [
        "# Ablation: saliency-weighted loss vs plain MSE",
        "",
        f"Made by `rfp bench ablation{' --quick' if header['quick'] else ''}` on {header['date']} "
        f"({header['device']}, {header['platform']}). Config: {header['config']}; {differ}. "
        f"Every row: {_seeds_phrase(header['seeds'])}, {header['train_images']} training images "
        f"({header['steps']} optimizer steps of {header['batch']}), {header['size']} px, "
        f"demo data {header['data_num']} images + 1 video per domain; evaluated on {header['n_eval']} held-out "
        f"domain-0 frames with {header['nfe']} velocity evaluations ({header['sampler']}). One judge grades every row "
        f"(held-out accuracy {_cell(header['judge_accuracy'], '{:.3f}')}); FD/KID in its feature space, where real "
        f"domain-1 frames score FD {_cell(header['fid_floor'], '{:.2f}')} / KID {_cell(header['kid_floor'], '{:.3f}')} "
        f"(the floor); structure similarity in the `{header['structure_encoder']}` space.",
        "",
        "| loss | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for label, per_seed in rows.items():
        lines.append(f"| {label} | " + " | ".join(_seeds_cell(per_seed, key, fmt) for key, _, fmt in COLUMNS) + " |")
    lines += [
        "",
        "What to read: `mask IoU` is the content kept (each input's true shape mask against the output's "
        "foreground); `transfer rate` is the share of outputs the judge calls domain 1. "
        f"{saliency_row} docs/METHOD.md predicts that the pure saliency-weighted loss keeps the shapes but lets the "
        "background drift (a colour cast: it gives almost no gradient to what does not change the domain), and "
        f"that plain MSE breaks the shapes into fragments. {parts}",
        "",
        "Cells: mean ± std (min–max) over the seeds. Sample grids (seed "
        f"{header['seeds'][0]}; top: inputs, bottom: outputs): "
        + ", ".join(f"[{label}]({header['grids'][label]})" for label in rows),
        "",
    ]
    return "\n".join(lines)


BEGIN, END = "<!-- ablation:begin (written by rfp bench ablation) -->", "<!-- ablation:end -->"
TITLE = "## Ablation — `rfp bench ablation`"
KEEP = [key for key, _, _ in COLUMNS] + [
    "fid_judge_floor",
    "kid_judge_floor",
    "mask_iou_input",
    "judge_accuracy",
    "n_eval",
    "run_dir",
]


def _seeds_phrase(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"


def run(
    quick: bool = False,
    device: str | None = None,
    retrain: bool = False,
    seeds: int | None = None,
    seed: int | None = None,
) -> dict:
    """Train (or reuse finished runs of the same config) and evaluate every variant for each seed; the
    table (a full run: for docs/, under "docs"). `seed`: that seed alone (its runs are then reused by a
    later `seeds` run: seeds can train in separate processes), its table under $RFP_HOME only."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.bench.quality_report import summarise
    from rfp_core.device import pick_device
    from rfp_core.media.demo_data import DEFAULT_NUM, make_demo_data

    start = time.perf_counter()
    dev = pick_device(device)
    base, config_name = demo_config()
    if quick:  # a smoke run: the `rfp train --smoke` budget (the demo's 1,600 steps x 3 rows took > 25 min)
        from rfp_core.train.run import smoke_config

        base, config_name = smoke_config(base), f"{config_name} (--smoke budget)"
    work = rfp_home() / "bench" / "ablation"
    data = make_demo_data(work / "demo_data", num=DEFAULT_NUM if not quick else 64)
    rows_to_run = variants(base)
    seed_list = [seed] if seed is not None else [base.seed + k for k in range(report.n_seeds(seeds, quick))]
    local = quick or seed is not None  # a part of the table: kept under $RFP_HOME, the docs left alone
    trained = {
        (v.label, s): _train_variant(base, config_name, v, s, data, quick, dev, retrain)
        for s in seed_list
        for v in rows_to_run
    }
    rows, grids, first, judge = _evaluate_rows(rows_to_run, seed_list, trained, data, quick, dev, local)
    lead = rows[rows_to_run[0].label][0]
    header = _header(quick, dev, config_name, base, first.cfg, data, lead, judge, grids, seed_list)
    table = markdown(rows, header)
    table_path = (work / "ABLATION.md") if local else project_root() / "docs" / "ABLATION.md"
    if local:
        atomic_write_text(table_path, table)
    print(f"ablation table: {table_path}", file=sys.stderr)
    # per row: each key's mean / std / min / max / n over the seeds under "seeds", its mean at the top
    out: dict[str, Any] = {}
    for label, per_seed in rows.items():
        stats = {k: summarise([m.get(k) for m in per_seed]) for k in KEEP if k != "run_dir"}
        out[label] = {
            **{k: v["mean"] for k, v in stats.items()},
            "run_dirs": [m.get("run_dir") for m in per_seed],
            "seeds": stats,
        }
    out.update(table=str(table_path), config=config_name, quick=quick, device=str(dev))
    out["seconds"] = time.perf_counter() - start
    out = report.jsonable(out)
    if not local:  # the grids beside the table, so the docs show the pictures as well as the numbers
        copies = {
            f"ablation/{v.slug}_translate.png": Path(rows[v.label][0]["paths"]["grid_translate"]) for v in rows_to_run
        }
        out[report.DOCS_KEY] = report.Docs(
            files={"ABLATION.md": table}, copies=copies, sections=[report.Section(BEGIN, END, TITLE, table)]
        )
    return out


def _header(
    quick: bool, dev, config_name: str, base: ModelConfig, cfg: ModelConfig, data, some: dict, judge, grids, seeds
):
    """The facts the table's header states: where, what config and budget, the judge and its floor."""
    return {
        "quick": quick,
        "date": report.today(),
        "device": str(dev),
        "platform": report.platform_line(),
        "config": config_name,
        "seeds": seeds,
        "train_images": cfg.velocity.train_images,
        "steps": cfg.velocity.total_steps,
        "batch": cfg.velocity.train_batch_size,
        "size": cfg.max_size,
        "data_num": data.num,
        "n_eval": some["n_eval"],
        "nfe": some["nfe"],
        "sampler": some["sampler"],
        "judge_accuracy": judge.accuracy,
        "fid_floor": some.get("fid_judge_floor"),
        "kid_floor": some.get("kid_judge_floor"),
        "structure_encoder": some.get("structure_encoder", "none"),
        "grids": grids,
        "mse_weight": base.velocity.mse_weight,
    }


def _train_variant(base: ModelConfig, config_name: str, v: Variant, seed: int, data, quick: bool, dev, retrain: bool):
    """(run folder, training seconds) of one row and seed: a finished run of exactly this config is reused."""
    from rfp_core.train.run import train_run

    cfg = config_from_dict(base.model_dump(mode="json"), source=config_name, overrides={**v.overrides, "seed": seed})
    run_id = f"ablation-{v.slug}-s{seed}" + ("-quick" if quick else "")

    def train() -> Path:
        return train_run(cfg, [data.domain0], [data.domain1], run_id=run_id, dev=quick, device=dev, progress=not quick)

    seconds, _ = train_once(
        runs_dir() / run_id,
        "ablation.json",
        {"config": comparable(cfg), "quick": quick},
        train,
        note="re-evaluating it (retrain=True trains afresh)",
        retrain=retrain,
    )
    return runs_dir() / run_id, seconds


def _evaluate_rows(rows_to_run: list[Variant], seeds: list[int], trained: dict, data, quick: bool, dev, local: bool):
    """Every row and seed measured by `evaluate_run`, graded by one judge trained once on the held-out
    real frames evaluate_run uses (the seeds share the data, hence the split); the first seed's grids as
    the table links them (full runs: where `rfp bench` copies them in docs/)."""
    from rfp_core.evaluate import evaluate_run, train_judge
    from rfp_core.inference.translate import Translator
    from rfp_core.media.datasets import FrameDataset
    from rfp_core.media.frame_store import FrameStore

    lead = (rows_to_run[0].label, seeds[0])
    first = Translator.from_run(trained[lead][0], dev)
    cfg = first.cfg
    store = FrameStore(max_side=cfg.store_max_side)
    manifest = trained[lead][0] / "manifest.parquet"
    frac = cfg.saliency.holdout_fraction
    held = [
        torch.stack(
            list(
                FrameDataset(manifest, store, d, cfg.max_size, split="holdout", holdout_fraction=frac, train_crop=False)
            )
        )
        for d in (0, 1)
    ]
    judge = train_judge(held[0], held[1], steps=60 if quick else 300, device=dev, seed=cfg.seed)
    encoder = _encoder(cfg, dev)
    rows: dict[str, list[dict]] = {v.label: [] for v in rows_to_run}
    grids: dict[str, str] = {}
    for (label, seed), (run_dir, seconds) in trained.items():
        translator = first if (label, seed) == lead else Translator.from_run(run_dir, dev)
        res = evaluate_run(
            translator,
            manifest,
            store,
            run_dir / "evaluation",
            masks_dir=data.masks_dir(0),
            structure_encoder=encoder,
            device=dev,
            judge=judge,
        )
        res.update(train_seconds=seconds, run_dir=str(run_dir), seed=seed)
        rows[label].append(res)
        slug = next(v.slug for v in rows_to_run if v.label == label)
        grids.setdefault(label, res["paths"]["grid_translate"] if local else f"ablation/{slug}_translate.png")
    return rows, grids, first, judge
