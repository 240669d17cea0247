"""The configs of `rfp bench quality`'s trained rows: every training key explicit, so a change of
the project's defaults does not move the results.

One dict per trained row in ROW_CONFIGS; rows differ only in velocity.loss / velocity.mse_weight(_mode) /
velocity.coupling(_space), one row in saliency.stop_on, and the paired row in its `"pairing"` key
(`rfp_core.flow.paired.pairing_mode`: "filenames" trains on the same-name pairs of a paired task).
Budget (full run): 200 optimizer steps of 16 at 32 px (2 shared CPU cores).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

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
        "source_noise": 0.0,
        "source_noise_min": None,
        "translate_noise": None,
        "source_noise_lowpass": None,
        "translate_retry_noise": [],
        "translate_retry_quantile": 0.1,
        # horizon 50 steps, a quarter of the 200-step budget: now that the warm-up reaches the
        # configured decay (after decay / (1 - decay) steps), 0.995 would average the whole run
        "lr_schedule": "cosine",
        "warmup_fraction": 0.05,
        "gradient_clip": 1.0,
        "channels_last": False,
        "adamw": "default",
        "compile": False,
        "cpu_threads": None,
        "ema": 0.98,
        "ema_warmup_steps": None,
        "bf16": False,
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
        "hog_cells": 8,
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


_RELATIVE = {"mse_weight": 1.0, "mse_weight_mode": "relative"}
_LOWPASS = {"loss": "mse", "source_noise_lowpass": 5.0, "bf16": True}


def _pairs(candidates: int, encoder: str = "thumbnail") -> dict[str, Any]:
    return {"structure": {"pairing": True, "candidates": candidates, "encoder": encoder}}


ROW_CONFIGS: dict[str, dict[str, Any]] = {
    # the paper's loss alone: saliency-weighted, no anchor
    "paper": _merge(_BASE, {"velocity": {"loss": "saliency", "mse_weight": 0.0}}),
    # issue 16: the same, its velocity net under bf16 autocast (the saliency jvp stays float32)
    "paper_bf16": _merge(_BASE, {"velocity": {"loss": "saliency", "mse_weight": 0.0, "bf16": True}}),
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
    # issue 17: Gaussian noise on the source (velocity.source_noise): the randomness a plain source
    # lacks to draw the target's texture from (docs/METHOD.md); bf16 as the recipe trains
    "paper_noise05": _merge(_BASE, {"velocity": {"source_noise": 0.5, "bf16": True}}),
    "paper_noise10": _merge(_BASE, {"velocity": {"source_noise": 1.0, "bf16": True}}),
    "mse_noise05": _merge(_BASE, {"velocity": {"loss": "mse", "source_noise": 0.5, "bf16": True}}),
    "relative_noise05": _merge(_BASE, {"velocity": {**_RELATIVE, "source_noise": 0.5, "bf16": True}}),
    # ... and structure pairing (the thumbnail encoder): each input with one of its K most similar targets
    "mse_noise03_pairs4": _merge(_BASE, {"velocity": {"loss": "mse", "source_noise": 0.3, "bf16": True}, **_pairs(4)}),
    "mse_noise05_pairs4": _merge(_BASE, {"velocity": {"loss": "mse", "source_noise": 0.5, "bf16": True}, **_pairs(4)}),
    "relative_noise05_pairs4": _merge(
        _BASE, {"velocity": {**_RELATIVE, "source_noise": 0.5, "bf16": True}, **_pairs(4)}
    ),
    "mse_noise05_pairs1": _merge(_BASE, {"velocity": {"loss": "mse", "source_noise": 0.5, "bf16": True}, **_pairs(1)}),
    # ... trained on every σ in [0.2, 0.5], so translating at a lower σ stays in distribution
    "mse_noise02to05_pairs1": _merge(
        _BASE, {"velocity": {"loss": "mse", "source_noise": 0.5, "source_noise_min": 0.2, "bf16": True}, **_pairs(1)}
    ),
    # ... paired by shape instead (the hog encoder: oriented edges, which read a digit through texture)
    "mse_noise05_hog1": _merge(
        _BASE, {"velocity": {"loss": "mse", "source_noise": 0.5, "bf16": True}, **_pairs(1, "hog")}
    ),
    # ... its noise coarser than 5 px only (velocity.source_noise_lowpass): a background and texture
    # to pick, no grain to remove; `_tNN`: translated at σ 0.NN (velocity.translate_noise)
    "mse_noise05lp5_pairs1": _merge(_BASE, {"velocity": {**_LOWPASS, "source_noise": 0.5}, **_pairs(1)}),
    "mse_noise04lp5_pairs1": _merge(_BASE, {"velocity": {**_LOWPASS, "source_noise": 0.4}, **_pairs(1)}),
    "mse_noise03to05lp5_t04_pairs1": _merge(
        _BASE,
        {"velocity": {**_LOWPASS, "source_noise": 0.5, "source_noise_min": 0.3, "translate_noise": 0.4}, **_pairs(1)},
    ),
    # the recommended recipe for new users, read from configs/translate.json itself (the README's)
    "recipe": json.loads((Path(__file__).resolve().parents[2] / "configs" / "translate.json").read_text()),
    # issue 11, item 5: the pix2pix setting on a paired task: the coupling is the true (same file
    # name) pairs and the loss plain MSE; the "mse" row on the same task is its unpaired twin
    "paired": {**_merge(_BASE, {"velocity": {"loss": "mse", "mse_weight": 0.0}}), "pairing": "filenames"},
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
# a paired task runs the reference rows, the paired row and its unpaired twin; the other tasks'
# file names do not pair, so they run every row but the paired ones
PAIRED_TASK_ROWS = ("identity", "tint", "mse", "paired")


def row_pairing(row: str) -> str:
    """ "filenames" for a row trained on true pairs, "unpaired" for every other row."""
    from rfp_core.flow.paired import pairing_mode

    return pairing_mode(ROW_CONFIGS.get(row, {}), source=f"quality row {row}")


def task_rows(rows: list[str], paired_task: bool) -> list[str]:
    """The asked-for rows that run on a task of this kind, in the asked order."""
    if paired_task:
        return [r for r in rows if r in PAIRED_TASK_ROWS]
    return [r for r in rows if r in REFERENCE_ROWS or row_pairing(r) == "unpaired"]


def row_config(row: str, seed: int, quick: bool, steps: int | None = None):
    """The row's ModelConfig (its "pairing" key is the training mode, not a config key: left out)."""
    from rfp_core.config_files import config_from_dict

    raw = {k: v for k, v in ROW_CONFIGS[row].items() if k != "pairing"}
    raw = _merge(raw, QUICK_OVERRIDES) if quick else raw
    over: dict[str, Any] = {"seed": seed}
    if steps is not None:
        v = raw["velocity"]
        over["velocity"] = {"train_images": steps * v["train_batch_size"]}
    return config_from_dict(raw, source=f"quality row {row}", overrides=over)
