"""`rfp bench ablation`: the demo config trained with the saliency-weighted loss and with plain MSE.

The rows (`VARIANTS`, in order): "saliency" is the demo config as it is, MSE anchor
(`velocity.mse_weight`) included when it has one; "saliency, no MSE anchor" is the same with
`mse_weight` 0, a row only when the demo config's anchor is positive (else it would repeat the
first); "mse" is plain rectified flow. Same data, seed and budget; rows differ only in
`velocity.loss` and `velocity.mse_weight`. All runs are graded by one judge (trained once on the
held-out real frames) and measured by `evaluate_run`; the table goes to docs/ABLATION.md and into
the ablation section of docs/BENCHMARKS.md (a `--quick` smoke run writes it under $RFP_HOME
instead, keeping the docs).
docs/METHOD.md predicts the trade-off: the saliency loss keeps the shapes (high mask IoU) but on its own
lets the background drift (a colour cast, which the anchor holds); MSE breaks the shapes.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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


def markdown(rows: dict[str, dict], header: dict[str, Any]) -> str:
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
        f"Every run: seed {header['seed']}, {header['train_images']} training images "
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
    for label, m in rows.items():
        lines.append(f"| {label} | " + " | ".join(_cell(m.get(key), fmt) for key, _, fmt in COLUMNS) + " |")
    lines += [
        "",
        "What to read: `mask IoU` is the content kept (each input's true shape mask against the output's "
        "foreground); `transfer rate` is the share of outputs the judge calls domain 1. "
        f"{saliency_row} docs/METHOD.md predicts that the pure saliency-weighted loss keeps the shapes but lets the "
        "background drift (a colour cast: it gives almost no gradient to what does not change the domain), and "
        f"that plain MSE breaks the shapes into fragments. {parts}",
        "",
        "Sample grids (top: inputs, bottom: outputs): "
        + ", ".join(f"[{label}]({header['grids'][label]})" for label in rows),
        "",
    ]
    return "\n".join(lines)


BEGIN, END = "<!-- ablation:begin (written by rfp bench ablation) -->", "<!-- ablation:end -->"


def splice_benchmarks(
    path: Path, table: str, begin: str = BEGIN, end: str = END, title: str = "## Ablation — `rfp bench ablation`"
) -> None:
    """Put the table (without its title) between the `begin` / `end` markers of docs/BENCHMARKS.md
    (the ablation's by default), replacing what was there; a file without the markers gets a
    section `title` with them appended once."""
    from rfp_core.atomic import atomic_write_text

    body = table.split("\n", 2)[2].strip() if table.startswith("# ") else table.strip()
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{title}\n\n" + block + "\n"
    atomic_write_text(path, text)


def _comparable(cfg: ModelConfig) -> dict:
    return cfg.model_dump(mode="json", exclude={"domain0", "domain1"})


def _finished(run_dir: Path, cfg: ModelConfig, quick: bool) -> float | None:
    """The training seconds of a finished ablation run of exactly this config, else None."""
    try:
        saved = json.loads((run_dir / "ablation.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = saved.get("config") == _comparable(cfg) and saved.get("quick") == quick
    return float(saved["train_seconds"]) if same and (run_dir / "velocity.pt").exists() else None


def run(quick: bool = False, device: str | None = None, retrain: bool = False) -> dict:
    """Train (or reuse finished runs of the same config) and evaluate every variant; write the table."""
    from rfp_core.atomic import atomic_write_text
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
    trained = {v.label: _train_variant(base, config_name, v, data, quick, dev, retrain) for v in rows_to_run}
    rows, grids, first, judge = _evaluate_rows(rows_to_run, trained, data, quick, dev)

    docs = project_root() / "docs"
    table_path = (work / "ABLATION.md") if quick else docs / "ABLATION.md"
    some = rows[rows_to_run[0].label]
    header = {
        "quick": quick,
        "date": time.strftime("%Y-%m-%d"),
        "device": str(dev),
        "platform": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "config": config_name,
        "seed": first.cfg.seed,
        "train_images": first.cfg.velocity.train_images,
        "steps": first.cfg.velocity.total_steps,
        "batch": first.cfg.velocity.train_batch_size,
        "size": first.cfg.max_size,
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
    table = markdown(rows, header)
    atomic_write_text(table_path, table)
    if not quick:
        splice_benchmarks(docs / "BENCHMARKS.md", table)
    print(f"ablation table: {table_path}", file=sys.stderr)

    keep = [key for key, _, _ in COLUMNS] + [
        "fid_judge_floor",
        "kid_judge_floor",
        "mask_iou_input",
        "judge_accuracy",
        "n_eval",
        "run_dir",
    ]
    out: dict[str, Any] = {label: {k: _json_safe(m.get(k)) for k in keep} for label, m in rows.items()}
    out.update(
        {
            "table": str(table_path),
            "config": config_name,
            "quick": quick,
            "device": str(dev),
            "seconds": time.perf_counter() - start,
        }
    )
    return json.loads(json.dumps(out, default=str))


def _train_variant(base: ModelConfig, config_name: str, v: Variant, data, quick: bool, dev, retrain: bool):
    """(run folder, training seconds) of one row: a finished run of exactly this config is reused."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.train.run import train_run

    cfg = config_from_dict(base.model_dump(mode="json"), source=config_name, overrides=v.overrides)
    run_id = f"ablation-{v.slug}" + ("-quick" if quick else "")
    done = _finished(runs_dir() / run_id, cfg, quick)
    if done is not None and not retrain:
        print(
            f"{run_id}: trained with this config already, re-evaluating it (retrain=True trains afresh)",
            file=sys.stderr,
        )
        return runs_dir() / run_id, done
    shutil.rmtree(runs_dir() / run_id, ignore_errors=True)  # a fresh run, never a resumed one
    t0 = time.perf_counter()
    run_dir = train_run(cfg, [data.domain0], [data.domain1], run_id=run_id, dev=quick, device=dev, progress=not quick)
    seconds = time.perf_counter() - t0
    atomic_write_text(
        run_dir / "ablation.json", json.dumps({"config": _comparable(cfg), "quick": quick, "train_seconds": seconds})
    )
    return run_dir, seconds


def _evaluate_rows(rows_to_run: list[Variant], trained: dict, data, quick: bool, dev):
    """Every row measured by `evaluate_run`, graded by one judge trained once on the held-out real frames
    evaluate_run uses; the grids copied beside the table (full runs)."""
    from rfp_core.evaluate import evaluate_run, train_judge
    from rfp_core.inference.translate import Translator
    from rfp_core.media.datasets import FrameDataset
    from rfp_core.media.frame_store import FrameStore

    lead = rows_to_run[0].label
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
    docs = project_root() / "docs"
    rows: dict[str, dict] = {}
    grids: dict[str, str] = {}
    for v in rows_to_run:
        run_dir, seconds = trained[v.label]
        translator = first if v.label == lead else Translator.from_run(run_dir, dev)
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
        res.update(train_seconds=seconds, run_dir=str(run_dir))
        rows[v.label] = res
        grid = Path(res["paths"]["grid_translate"])
        if quick:
            grids[v.label] = str(grid)
            continue
        # the grids beside the table, so the docs show the pictures as well as the numbers
        target = docs / "ablation" / f"{v.slug}_translate.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, target)
        grids[v.label] = f"ablation/{v.slug}_translate.png"
    return rows, grids, first, judge


def _json_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v
