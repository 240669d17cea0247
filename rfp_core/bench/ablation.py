"""`rfp bench ablation`: the demo config trained with the saliency-weighted loss and with plain MSE.

Same data, seed and budget; only `velocity.loss` differs. Both runs are graded by one judge
(trained once on the held-out real frames) and measured by `evaluate_run`; the table goes to
docs/ABLATION.md (a `--quick` smoke run writes it under $RFP_HOME instead, keeping the docs).
method.md predicts the trade-off: saliency keeps the shapes (high mask IoU), MSE breaks them.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rfp_core.config import ModelConfig, config_from_dict, load_config
from rfp_core.paths import project_root, rfp_home, runs_dir

LOSSES = ("saliency", "mse")
# Used only when configs/demo.json is missing (said so in the table's header).
FALLBACK_CONFIG: dict[str, Any] = {
    "type": "RFPix2pixModel", "max_size": 32, "seed": 0,
    "velocity": {
        "net": {"model_channels": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": []},
        "learning_rate": 1e-3, "train_images": 24_000, "train_batch_size": 16, "train_minibatch_size": 16,
        "timestep_sampling": "uniform", "lr_schedule": "cosine", "warmup_fraction": 0.05, "ema": 0.99,
        "num_inference_steps": 8, "sample_every_images": 8_000,
    },
    "saliency": {
        "net": {"backbone": "resnet18", "pretrained": False, "latent_channels": 64},
        "learning_rate": 1e-3, "accuracy_threshold": 0.98, "warmup_threshold": 0.9,
        "augmentations": ["hflip"], "batch_size": 16, "max_steps": 1500, "eval_every": 25,
    },
    "structure": {"encoder": "thumbnail"},
}
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
    """configs/demo.json when present, else the built-in fallback; and which one it was."""
    path = project_root() / "configs" / "demo.json"
    if path.exists():
        return load_config(path), "configs/demo.json"
    return config_from_dict(FALLBACK_CONFIG, source="ablation fallback"), "built-in fallback (configs/demo.json was missing)"


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
    lines = [
        "# Ablation: saliency-weighted loss vs plain MSE",
        "",
        f"Made by `rfp bench ablation{' --quick' if header['quick'] else ''}` on {header['date']} "
        f"({header['device']}, {header['platform']}). Config: {header['config']}; only `velocity.loss` differs. "
        f"Both runs: seed {header['seed']}, {header['train_images']} training images "
        f"({header['steps']} optimizer steps of {header['batch']}), {header['size']} px, "
        f"demo data {header['data_num']} images + 1 video per domain; evaluated on {header['n_eval']} held-out "
        f"domain-0 frames with {header['nfe']} velocity evaluations ({header['sampler']}). One judge grades both "
        f"(held-out accuracy {_cell(header['judge_accuracy'], '{:.3f}')}); FD/KID in its feature space, where real "
        f"domain-1 frames score FD {_cell(header['fid_floor'], '{:.2f}')} / KID {_cell(header['kid_floor'], '{:.3f}')} "
        f"(the floor); structure similarity in the `{header['structure_encoder']}` space.",
        "",
        "| loss | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for loss, m in rows.items():
        lines.append(f"| {loss} | " + " | ".join(_cell(m.get(key), fmt) for key, _, fmt in COLUMNS) + " |")
    lines += [
        "",
        "What to read: `mask IoU` is the content kept (each input's true shape mask against the output's "
        "foreground); `transfer rate` is the share of outputs the judge calls domain 1. method.md expects "
        "the saliency-weighted loss to keep the shapes and plain MSE to break them into fragments.",
        "",
        "Sample grids (top: inputs, bottom: outputs): "
        + ", ".join(f"[{loss}]({header['grids'][loss]})" for loss in rows),
        "",
    ]
    return "\n".join(lines)


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
    """Train (or reuse finished runs of the same config) and evaluate both losses; write the table."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.data import FrameDataset
    from rfp_core.demo_data import DEFAULT_NUM, make_demo_data
    from rfp_core.evaluate import evaluate_run, train_judge
    from rfp_core.frame_store import FrameStore
    from rfp_core.train.run import pick_device, train_run
    from rfp_core.translate import Translator

    start = time.perf_counter()
    dev = pick_device(device)
    base, config_name = demo_config()
    work = rfp_home() / "bench" / "ablation"
    data = make_demo_data(work / "demo_data", num=DEFAULT_NUM if not quick else 64)

    trained: dict[str, tuple[Path, float]] = {}
    for loss in LOSSES:
        cfg = config_from_dict(base.model_dump(mode="json"), source=config_name, overrides={"velocity": {"loss": loss}})
        run_id = f"ablation-{loss}" + ("-quick" if quick else "")
        done = _finished(runs_dir() / run_id, cfg, quick)
        if done is not None and not retrain:
            print(f"{run_id}: trained with this config already, re-evaluating it (retrain=True trains afresh)", file=sys.stderr)
            trained[loss] = (runs_dir() / run_id, done)
            continue
        shutil.rmtree(runs_dir() / run_id, ignore_errors=True)  # a fresh run, never a resumed one
        t0 = time.perf_counter()
        run_dir = train_run(cfg, [data.domain0], [data.domain1], run_id=run_id, dev=quick, device=dev, progress=not quick)
        trained[loss] = (run_dir, time.perf_counter() - t0)
        atomic_write_text(run_dir / "ablation.json", json.dumps({"config": _comparable(cfg), "quick": quick,
                                                                 "train_seconds": trained[loss][1]}))

    # one judge for both rows, trained on the same held-out real frames evaluate_run uses
    first = Translator.from_run(trained[LOSSES[0]][0], dev)
    cfg = first.cfg
    store = FrameStore(max_side=cfg.store_max_side)
    manifest = trained[LOSSES[0]][0] / "manifest.parquet"
    frac = cfg.saliency.holdout_fraction
    held = [torch.stack(list(FrameDataset(manifest, store, d, cfg.max_size, split="holdout", holdout_fraction=frac,
                                          train_crop=False))) for d in (0, 1)]
    judge = train_judge(held[0], held[1], steps=60 if quick else 300, device=dev, seed=cfg.seed)
    encoder = _encoder(cfg, dev)

    docs = project_root() / "docs"
    table_path = (work / "ABLATION.md") if quick else docs / "ABLATION.md"
    rows: dict[str, dict] = {}
    grids: dict[str, str] = {}
    for loss in LOSSES:
        run_dir, seconds = trained[loss]
        translator = first if loss == LOSSES[0] else Translator.from_run(run_dir, dev)
        res = evaluate_run(translator, manifest, store, run_dir / "evaluation", masks_dir=data.masks_dir(0),
                           structure_encoder=encoder, device=dev, judge=judge)
        res["train_seconds"] = seconds
        res["run_dir"] = str(run_dir)
        rows[loss] = res
        grid = Path(res["paths"]["grid_translate"])
        if not quick:
            # the grids beside the table, so the docs show the pictures as well as the numbers
            target = docs / "ablation" / f"{loss}_translate.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, target)
            grids[loss] = f"ablation/{loss}_translate.png"
        else:
            grids[loss] = str(grid)

    some = rows[LOSSES[0]]
    header = {
        "quick": quick, "date": time.strftime("%Y-%m-%d"), "device": str(dev),
        "platform": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "config": config_name, "seed": cfg.seed, "train_images": cfg.velocity.train_images,
        "steps": cfg.velocity.total_steps, "batch": cfg.velocity.train_batch_size,
        "size": cfg.max_size, "data_num": data.num, "n_eval": some["n_eval"], "nfe": some["nfe"],
        "sampler": some["sampler"], "judge_accuracy": judge.accuracy,
        "fid_floor": some.get("fid_judge_floor"), "kid_floor": some.get("kid_judge_floor"),
        "structure_encoder": some.get("structure_encoder", "none"), "grids": grids,
    }
    atomic_write_text(table_path, markdown(rows, header))
    print(f"ablation table: {table_path}", file=sys.stderr)

    keep = [key for key, _, _ in COLUMNS] + ["fid_judge_floor", "kid_judge_floor", "mask_iou_input", "judge_accuracy",
                                             "n_eval", "run_dir"]
    out: dict[str, Any] = {loss: {k: _json_safe(rows[loss].get(k)) for k in keep} for loss in LOSSES}
    out.update({"table": str(table_path), "config": config_name, "quick": quick, "device": str(dev),
                "seconds": time.perf_counter() - start})
    return json.loads(json.dumps(out, default=str))


def _json_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v
