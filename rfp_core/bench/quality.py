"""`rfp bench quality`: does a translation change the style AND keep what the picture shows?

On two tasks of real images (`quality_tasks`: digits -> MNIST-M-style textured digits; photo
patches -> a painterly look), every row is trained with `train_run` for each seed, translates the
held-out domain-0 inputs with `Translator.from_run`, and is scored by judges trained afresh on
held-out labelled real images (never on the model's nets; `rfp_core.evaluate.judges`):

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
domain's mean and spread).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rfp_core.bench import quality_tasks as QT
from rfp_core.train.saliency import SaliencyThresholdNotReached

# ----------------------------------------------------------------------------------------
# the configs: every training key explicit, so a change of the project's defaults does not move
# the results. One dict per trained row in ROW_CONFIGS; rows differ only in velocity.loss /
# velocity.mse_weight(_mode) / velocity.coupling(_space), and one row in saliency.stop_on.
# Budget (full run): 200 optimizer steps of 16 at 32 px (2 shared CPU cores).

_BASE: dict[str, Any] = {
    "type": "RFPix2pixModel",
    "max_size": 32,
    "seed": 0,
    "store_max_side": 512,
    "codec": {"net": {"type": "Identity"}},
    "saliency": {
        "net": {
            "type": "ResNetSaliencyNet",
            "backbone": "resnet18",
            "num_classes": 2,
            "pretrained": False,
            "pretrained_path": None,
            "latent_channels": 64,
        },
        "learning_rate": 1e-3,
        "accuracy_threshold": 0.95,
        "warmup_threshold": 0.8,
        "blend_fraction": 0.1,
        "label_smoothing": 0.1,
        "augmentations": ["hflip"],
        "batch_size": 32,
        "max_steps": 1500,
        "eval_every": 25,
        "holdout_fraction": 0.1,
        "stop_on": "holdout",
        "smoothing_window": 100,
        "checkpoint_every_steps": None,
    },
    "velocity": {
        "net": {
            "type": "UNet",
            "model_channels": 32,
            "ch_mult": [1, 2, 2],
            "normalization": "GroupNormAuto",
            "activation": "SiLU",
            "num_res_blocks": 2,
            "zero_res_blocks": False,
            "zero_out": True,
            "attention_resolutions": [],
            "num_attention_heads": 4,
            "downsample": "StridedConv",
            "upsample": "NearestConv",
            "mid_attention": False,
            "output_activation": "None",
        },
        "learning_rate": 5e-4,
        "weight_decay": 1e-4,
        "train_images": 3200,
        "train_batch_size": 16,
        "train_minibatch_size": 16,
        "timestep_sampling": "logit-normal",
        "loss": "saliency",
        "mse_weight": 0.0,
        "mse_weight_mode": "absolute",
        "coupling": "independent",
        "coupling_space": "pixel",
        # horizon 50 steps, a quarter of the 200-step budget: now that the warm-up reaches the
        # configured decay (after decay / (1 - decay) steps), 0.995 would average the whole run
        "lr_schedule": "cosine",
        "warmup_fraction": 0.05,
        "gradient_clip": 1.0,
        "ema": 0.98,
        "ema_warmup_steps": None,
        "bf16": False,
        "channels_last": False,
        "adamw": "default",
        "compile": False,
        "cpu_threads": None,
        "num_inference_steps": 8,
        "sampler": "euler",
        "sample_batch_size": 8,
        "sample_every_images": 1_000_000,
        "checkpoint_every_minutes": 10.0,
        "checkpoint_every_steps": None,
    },
    # unpaired, as in the paper: no structure pairing (it would pair digits by shape for MSE too)
    "structure": {
        "pairing": False,
        "candidates": 1,
        "encoder": "thumbnail",
        "weights_path": None,
        "thumbnail_size": 16,
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


ROW_CONFIGS: dict[str, dict[str, Any]] = {
    # the paper's loss alone: saliency-weighted, no anchor
    "paper": _merge(_BASE, {"velocity": {"loss": "saliency", "mse_weight": 0.0}}),
    # the saliency loss plus the demo's MSE anchor (configs/demo.json: 500)
    "anchored": _merge(_BASE, {"velocity": {"loss": "saliency", "mse_weight": 500.0}}),
    # plain rectified flow
    "mse": _merge(_BASE, {"velocity": {"loss": "mse", "mse_weight": 0.0}}),
    # issue 17, item 2: the anchor as a share of the saliency term (1.0 = as large as it)
    "anchored_relative": _merge(_BASE, {"velocity": {"mse_weight": 1.0, "mse_weight_mode": "relative"}}),
    # minibatch optimal-transport coupling, in the flow's own space (pixels here) ...
    "paper_ot": _merge(_BASE, {"velocity": {"coupling": "minibatch_ot"}}),
    "anchored_ot": _merge(_BASE, {"velocity": {"mse_weight": 500.0, "coupling": "minibatch_ot"}}),
    "mse_ot": _merge(_BASE, {"velocity": {"loss": "mse", "coupling": "minibatch_ot"}}),
    # ... and in the structure encoder's space (the weight-free thumbnail layouts)
    "anchored_ot_structure": _merge(
        _BASE, {"velocity": {"mse_weight": 500.0, "coupling": "minibatch_ot", "coupling_space": "structure"}}
    ),
    # item 3: the saliency phase stopped on the original's smoothed training accuracy
    "anchored_train_stop": _merge(
        _BASE, {"saliency": {"stop_on": "train_smoothed"}, "velocity": {"mse_weight": 500.0}}
    ),
}
# --quick: tiny nets and a few dozen steps (a CI smoke run, not a measurement)
QUICK_OVERRIDES: dict[str, Any] = {
    "saliency": {
        "net": {"latent_channels": 16},
        "accuracy_threshold": 0.75,
        "warmup_threshold": 0.6,
        "batch_size": 16,
        "max_steps": 300,
        "eval_every": 10,
        "holdout_fraction": 0.2,
        "smoothing_window": 20,
    },
    "velocity": {
        "net": {"model_channels": 16, "ch_mult": [1, 2], "num_attention_heads": 2},
        "train_images": 30 * 8,
        "train_batch_size": 8,
        "train_minibatch_size": 8,
        "num_inference_steps": 4,
    },
}
REFERENCE_ROWS = ("identity", "tint")
ROWS = REFERENCE_ROWS + tuple(ROW_CONFIGS)
# judge training steps (full, quick)
JUDGE_STEPS = {"domain": (400, 60), "content": (400, 60), "two_sample": (150, 100)}
METRICS = (
    "content_kept",
    "transfer_rate",
    "two_sample_acc",
    "fd",
    "kid",
    "edge_agreement",
    "straightness",
    "nfe",
    "wall_s",
)


def row_config(row: str, seed: int, quick: bool, steps: int | None = None):
    from rfp_core.config import config_from_dict

    raw = _merge(ROW_CONFIGS[row], QUICK_OVERRIDES) if quick else ROW_CONFIGS[row]
    over: dict[str, Any] = {"seed": seed}
    if steps is not None:
        v = raw["velocity"]
        over["velocity"] = {"train_images": steps * v["train_batch_size"]}
    return config_from_dict(raw, source=f"quality row {row}", overrides=over)


# ----------------------------------------------------------------------------------------
# judges, once per task


def train_judges(task: QT.Task, quick: bool, device: torch.device) -> dict[str, Any]:
    """The task's judges, trained on its `judge` pool, and their ceilings on its `eval` pool."""
    from rfp_core.evaluate import train_judge
    from rfp_core.evaluate.judges import train_content_judge
    from rfp_core.evaluate.metrics import frechet_distance, kid

    k = 1 if quick else 0
    j0, _ = task.load("judge", 0)
    j1, y1 = task.load("judge", 1)
    e0, y0 = task.load("eval", 0)
    e1, ye1 = task.load("eval", 1)
    domain = train_judge(j0, j1, steps=JUDGE_STEPS["domain"][k], device=device, seed=0)
    content = train_content_judge(j1, y1, task.n_classes, steps=JUDGE_STEPS["content"][k], device=device, seed=0)
    real_acc = float(torch.cat([domain.predict_proba(e0) < 0.5, domain.predict_proba(e1) >= 0.5]).float().mean())
    f_e1, f_j1 = domain.features(e1).numpy(), domain.features(j1[: len(e1)]).numpy()
    return {
        "domain": domain,
        "content": content,
        "inputs": e0,
        "labels": y0,
        "real": e1,
        "real_features": f_e1,
        "ceilings": {
            "domain_judge_acc": real_acc,  # real eval images of both domains told apart
            "content_judge_acc": content.accuracy(e1, ye1),  # the ceiling of content_kept
            "content_judge_acc_domain0": content.accuracy(e0, y0),  # the same judge on untranslated inputs
            "chance": 1.0 / task.n_classes,
            # real target images (judge pool) against real target images (eval pool): FD/KID's floor
            "fd_floor": frechet_distance(f_j1, f_e1),
            "kid_floor": kid(f_j1, f_e1),
        },
        "n_eval": len(e0),
        "n_judge": len(j0) + len(j1),
    }


def tint(
    x: torch.Tensor, stats0: tuple[torch.Tensor, torch.Tensor], stats1: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The flat colour wash: every channel mapped from domain 0's mean / spread to domain 1's."""
    (m0, s0), (m1, s1) = stats0, stats1
    return ((x - m0.view(1, 3, 1, 1)) / s0.view(1, 3, 1, 1) * s1.view(1, 3, 1, 1) + m1.view(1, 3, 1, 1)).clamp(-1, 1)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def score(out: torch.Tensor, judges: dict, quick: bool, seed: int, device: torch.device) -> dict[str, float]:
    """Every judge's verdict on one row's translations of the task's eval inputs."""
    from rfp_core.evaluate.judges import two_sample_accuracy
    from rfp_core.evaluate.metrics import edge_agreements, frechet_distance, kid

    out = out.clamp(-1, 1)
    feats = judges["domain"].features(out).numpy()
    return {
        "content_kept": judges["content"].accuracy(out, judges["labels"]),
        "transfer_rate": float((judges["domain"].predict_proba(out) >= 0.5).float().mean()),
        "two_sample_acc": two_sample_accuracy(
            judges["real"], out, steps=JUDGE_STEPS["two_sample"][int(quick)], device=device, seed=seed
        ),
        "fd": frechet_distance(feats, judges["real_features"]),
        "kid": kid(feats, judges["real_features"]),
        "edge_agreement": float(np.mean(edge_agreements(judges["inputs"], out))),
    }


# ----------------------------------------------------------------------------------------
# training rows


def _comparable(cfg) -> dict:
    return cfg.model_dump(mode="json", exclude={"domain0", "domain1"})


def _finished(run_dir: Path, cfg) -> float | None:
    """Training seconds of a finished run of exactly this config (a rerun reuses it), else None."""
    try:
        saved = json.loads((run_dir / "quality.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = saved.get("config") == _comparable(cfg) and (run_dir / "velocity.pt").exists()
    return float(saved["train_seconds"]) if ok else None


def _share_saliency(cfg, run_dir: Path, done: dict[tuple, Path]) -> None:
    """Rows with the same saliency settings, seed and data train the same phase-1 net: copy a
    finished one into this run folder, and `train_saliency` sees it is done and skips it."""
    if cfg.velocity.loss != "saliency":
        return
    key = (json.dumps(cfg.saliency.model_dump(mode="json"), sort_keys=True), cfg.seed, cfg.max_size)
    src = done.get(key)
    if src is not None and (src / "saliency.pt").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("saliency.pt", "saliency_state.json"):
            shutil.copyfile(src / name, run_dir / name)
    done.setdefault(key, run_dir)


def train_row(
    task: QT.Task, row: str, seed: int, quick: bool, device: torch.device, steps: int | None, shared: dict[tuple, Path]
) -> tuple[Path, float]:
    from rfp_core.atomic import atomic_write_text
    from rfp_core.paths import runs_dir
    from rfp_core.train.run import train_run

    cfg = row_config(row, seed, quick, steps)
    run_id = f"quality-{task.name}-{row}-s{seed}" + ("-quick" if quick else "")
    run_dir = runs_dir() / run_id
    seconds = _finished(run_dir, cfg)
    if seconds is not None:
        print(f"{run_id}: trained with this config already, re-scoring it", file=sys.stderr)
        shared.setdefault(
            (json.dumps(cfg.saliency.model_dump(mode="json"), sort_keys=True), cfg.seed, cfg.max_size), run_dir
        )
        return run_dir, seconds
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed one
    _share_saliency(cfg, run_dir, shared)
    t0 = time.perf_counter()
    train_run(cfg, [task.folder("train0", 0)], [task.folder("train1", 1)], run_id=run_id, device=device, progress=False)
    seconds = time.perf_counter() - t0
    atomic_write_text(run_dir / "quality.json", json.dumps({"config": _comparable(cfg), "train_seconds": seconds}))
    return run_dir, seconds


@torch.no_grad()
def translate_all(run_dir: Path, x: torch.Tensor, device: torch.device, batch: int = 64) -> tuple[torch.Tensor, dict]:
    from rfp_core import flow
    from rfp_core.translate import Translator

    tr = Translator.from_run(run_dir, device)
    steps, sampler = tr.cfg.velocity.num_inference_steps, tr.cfg.velocity.sampler
    out = torch.cat([tr.translate(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])
    z0 = tr.encode(x[:batch].to(device))
    return out, {"straightness": flow.straightness(tr.velocity, z0, steps, sampler), "nfe": flow.nfe(sampler, steps)}


# ----------------------------------------------------------------------------------------
# the runner


def _parse_list(value: str | list[str] | tuple[str, ...] | None, allowed: tuple[str, ...], what: str) -> list[str]:
    from rfp_core.config import ConfigError

    if value is None:
        return list(allowed)
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ConfigError(f"--{what}: unknown {', '.join(bad) or '(empty)'}; choose from {','.join(allowed)}")
    return items


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
    from rfp_core.images import save_grid
    from rfp_core.paths import rfp_home

    task = QT.make_task(
        name, rfp_home() / "bench" / "quality" / ("quick" if quick else "full") / name, QT.QUICK if quick else QT.FULL
    )
    t0 = time.perf_counter()
    judges = train_judges(task, quick, device)
    print(f"{name}: judges trained in {time.perf_counter() - t0:.0f} s; ceilings {judges['ceilings']}", file=sys.stderr)
    x = judges["inputs"]
    stats0, stats1 = channel_stats(task.load("train0", 0)[0]), channel_stats(task.load("train1", 1)[0])
    shared: dict[tuple, Path] = {}
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
            t_row = time.perf_counter()
            if row == "identity":
                out, flow_stats, train_s = x.clone(), {"straightness": None, "nfe": 0}, 0.0
            elif row == "tint":
                out, flow_stats, train_s = tint(x, stats0, stats1), {"straightness": None, "nfe": 0}, 0.0
            else:
                try:
                    run_dir, train_s = train_row(task, row, seed, quick, device, steps, shared)
                except SaliencyThresholdNotReached as exc:  # a failed row is a result, not the end of the run
                    print(f"{name}/{row}/seed {seed}: {exc}", file=sys.stderr)
                    per_row[row].append({"seed": seed, "error": str(exc)[:300]})
                    continue
                out, flow_stats = translate_all(run_dir, x, device)
            wall = train_s + (time.perf_counter() - t_row)  # training + translation (not the scoring)
            res = {"seed": seed, **score(out, judges, quick, seed, device), **flow_stats, "wall_s": wall}
            per_row[row].append(res)
            print(
                f"{name}/{row}/seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float)),
                file=sys.stderr,
            )
            if row not in grids:  # the first seed's outputs: inputs above, outputs below
                grids[row] = str(save_grid([x[:8], out[:8].clamp(-1, 1)], grid_dir / f"{name}_{row}.png"))
            if save is not None:
                save(result)
    return result


def summarise(values: list[float | None]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    a = np.asarray(vals)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(a),
    }


def run(
    quick: bool = False,
    device: str | None = None,
    seeds: int | None = None,
    tasks: str | None = None,
    rows: str | None = None,
    steps: int | None = None,
) -> dict:
    """Every task x row x seed; writes the grids, the raw JSON and the table; returns the summary."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.bench.ablation import splice_benchmarks
    from rfp_core.bench.quality_report import markdown
    from rfp_core.device import pick_device
    from rfp_core.paths import project_root, rfp_home

    start = time.perf_counter()
    dev = pick_device(device)
    task_names = _parse_list(tasks, tuple(QT.TASKS), "tasks")
    row_names = _parse_list(rows, ROWS, "rows")
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        from rfp_core.config import ConfigError

        raise ConfigError(f"--seeds must be at least 1, got {n_seeds}")
    # quick runs write under $RFP_HOME and leave the docs as they are
    out_dir = (rfp_home() / "bench" / "quality" / "report") if quick else project_root() / "docs" / "quality"
    out_dir.mkdir(parents=True, exist_ok=True)
    example = row_config(next((r for r in row_names if r in ROW_CONFIGS), "paper"), 0, quick, steps)
    header = {
        "quick": quick,
        "date": time.strftime("%Y-%m-%d"),
        "device": str(dev),
        "seeds": n_seeds,
        "platform": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "steps": example.velocity.total_steps,
        "batch": example.velocity.train_batch_size,
        "size": example.max_size,
        "model_channels": example.velocity.net.model_channels,
        "ch_mult": example.velocity.net.ch_mult,
        "nfe": example.velocity.num_inference_steps,
        "sampler": example.velocity.sampler,
        "anchor": ROW_CONFIGS["anchored"]["velocity"]["mse_weight"],
        "minutes": 0.0,
        "command": "rfp bench quality"
        + (" --quick" if quick else "")
        + f" --seeds {n_seeds}"
        + f" --tasks {','.join(task_names)} --rows {','.join(row_names)}"
        + (f" --steps {steps}" if steps else ""),
    }

    def save(name: str, res: dict) -> None:
        # one raw file per task (runs of one task each can share the folder); the table from all of them
        stamp = {**header, "minutes": (time.perf_counter() - start) / 60.0}
        atomic_write_text(out_dir / f"{name}.json", json.dumps({"header": stamp, **res}, indent=1, default=str) + "\n")
        table = markdown(collect(out_dir), out_dir, quick)
        atomic_write_text(out_dir / "QUALITY.md", table)
        if not quick:
            splice_benchmarks(
                project_root() / "docs" / "BENCHMARKS.md",
                table,
                begin=BEGIN,
                end=END,
                title="## Translation quality on real images — `rfp bench quality`",
            )

    results = {
        name: run_task(
            name,
            row_names,
            list(range(n_seeds)),
            quick,
            dev,
            steps,
            out_dir,
            save=lambda res, name=name: save(name, res),
        )
        for name in task_names
    }
    print(f"quality table: {out_dir / 'QUALITY.md'}; raw: {out_dir}/<task>.json", file=sys.stderr)

    summary: dict[str, Any] = {}
    for name, res in results.items():
        summary[name] = {
            "ceilings": res["ceilings"],
            **{
                row: {m: summarise([r.get(m) for r in per_seed]) for m in ("content_kept", "transfer_rate")}
                for row, per_seed in res["rows"].items()
            },
        }
    summary.update(
        {
            "quick": quick,
            "seeds": n_seeds,
            "device": str(dev),
            "seconds": time.perf_counter() - start,
            "raw": [str(out_dir / f"{name}.json") for name in results],
        }
    )
    return json.loads(json.dumps(summary, default=str))


BEGIN, END = "<!-- quality:start -->", "<!-- quality:end -->"


def collect(out_dir: Path) -> dict[str, dict]:
    """Every task's raw results in `out_dir`, in the tasks' order (this run's and earlier runs')."""
    found = {}
    for name in QT.TASKS:
        try:
            found[name] = json.loads((out_dir / f"{name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return found
