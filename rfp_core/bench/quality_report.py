"""The markdown table of `rfp bench quality`: per task, one line per row, mean ± std (min–max) over seeds."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = [
    ("content_kept", "content kept ↑", "{:.3f}"),
    ("transfer_rate", "transfer rate ↑", "{:.3f}"),
    ("two_sample_acc", "two-sample acc. (0.5 best)", "{:.3f}"),
    ("fd", "FD ↓", "{:.2f}"),
    ("kid", "KID ↓", "{:.3f}"),
    ("edge_agreement", "edge agreement ↑", "{:.3f}"),
    ("straightness", "straightness ↓", "{:.4f}"),
    ("nfe", "NFE", "{:.1f}"),
    ("wall_s", "wall s", "{:.0f}"),
]
ROW_LABELS = {
    "identity": "identity (inputs untranslated)",
    "tint": "tint baseline (colour wash)",
    "paper": "paper: saliency loss",
    "paper_bf16": "paper, velocity net in bf16 autocast",
    "recipe": "recipe: configs/translate.json",
    "anchored": "anchored: saliency + MSE",
    "mse": "mse: plain rectified flow",
    "paired": "paired: true pairs (same file name), MSE",
    "mse_noise05_pairs1": "mse, source noise 0.5, nearest-structure pairs (= configs/translate.json)",
}


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summarise(values: list[Any]) -> dict[str, float | None]:
    """mean / std / min / max / n of the finite values (the last-line JSON's per-row figures)."""
    vals = _finite(values)
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


def cell(values: list[Any], fmt: str) -> str:
    """mean ± std (min–max) over seeds; one value alone; – when there is none."""
    vals = _finite(values)
    if not vals:
        return "–"
    a = np.asarray(vals)
    if len(a) == 1 or float(a.max() - a.min()) == 0.0:
        return fmt.format(a[0]) + (f" (×{len(a)})" if len(a) > 1 else "")
    return f"{fmt.format(a.mean())} ± {fmt.format(a.std(ddof=1))} ({fmt.format(a.min())}–{fmt.format(a.max())})"


def _link(path: str, out_dir: Path, quick: bool) -> str:
    # the docs table links the grids relative to docs/ (they live in docs/quality/)
    return path if quick else os.path.relpath(path, Path(out_dir).parent)


def _budget(h: dict) -> str:
    return (
        f"Made by `{h['command']}` on {h['date']} ({h['device']}, {h['platform']}; {h['minutes']:.0f} min). "
        f"Budget per trained row and seed: {h['steps']} optimizer steps of {h['batch']} at {h['size']} px, UNet "
        f"{h['model_channels']} ch × {h['ch_mult']}, pixel space, {h['nfe']} "
        f"{h['sampler']} steps to translate; {h['seeds']} seed(s) (the training seed; data and judges fixed; the "
        f"reference rows need no training and are scored once). Anchored: `mse_weight` {h['anchor']:g}."
        + (f" **{h['note']}**" if h.get("note") else "")
    )


def task_section(name: str, res: dict, out_dir: Path, quick: bool) -> list[str]:
    c = res["ceilings"]
    lines = [
        f"### {name}",
        "",
        _budget(res["header"]),
        "",
        f"{res['style']}. {res['n_eval']} held-out domain-0 inputs translated and scored; judges trained on "
        f"{res['n_judge']} other labelled real images (a disjoint pool the translator never saw). "
        f"Domain judge accuracy on real held-out images {c['domain_judge_acc']:.3f}; content judge ceiling "
        f"(its accuracy on real held-out target images) **{c['content_judge_acc']:.3f}** (chance {c['chance']:.3f}; "
        f"on the untranslated domain-0 inputs {c['content_judge_acc_domain0']:.3f}); FD / KID floor (real target "
        f"images vs real target images) {c['fd_floor']:.2f} / {c['kid_floor']:.3f}.",
        "",
        "| row | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for row, per_seed in res["rows"].items():
        cells = [cell([r.get(k) for r in per_seed if "error" not in r], fmt) for k, _, fmt in COLUMNS]
        lines.append(f"| {ROW_LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    grids = ", ".join(f"[{row}]({_link(p, out_dir, quick)})" for row, p in res["grids"].items())
    failed = [f"{row} seed {r['seed']}" for row, per_seed in res["rows"].items() for r in per_seed if "error" in r]
    if failed:
        lines += ["", "Not trained (saliency threshold not reached): " + ", ".join(failed) + "."]
    lines += ["", f"Grids (top: inputs, bottom: outputs, seed 0): {grids}", ""]
    return lines


def markdown(results: dict[str, dict], out_dir: Path, quick: bool) -> str:
    lines = [
        "# Translation quality on real images",
        "",
        "Real images that ship with scikit-learn and scikit-image (nothing downloaded). Trained rows differ only in "
        "`velocity.loss` / `velocity.mse_weight` (`_ot` rows: `velocity.coupling` minibatch_ot, `_structure` in the "
        "thumbnail encoder's space; `_relative`: `velocity.mse_weight_mode` relative, weight 1.0; `_train_stop`: "
        '`saliency.stop_on` train_smoothed; `paired`: `"pairing": "filenames"`, trained on the true '
        "same-name pairs of a paired task, plain MSE; `_noiseNN`: `velocity.source_noise` 0.NN (`_noiseMMtoNN`: "
        "each sample's σ drawn from [0.MM, 0.NN], `velocity.source_noise_min`; `lpP`: only the noise "
        "coarser than P px, `velocity.source_noise_lowpass`; `_tNN`: translated from σ 0.NN); `_pairsK`: structure "
        "pairing with the thumbnail encoder, each input paired with one of its K most similar target images "
        "(`_hogK`: by the hog encoder) — every other row is unpaired); configs in "
        "`rfp_core/bench/quality_configs.py` (`ROW_CONFIGS`). "
        "Cells: mean ± std (min–max) over seeds.",
        "",
        "What to read: *content kept* is the content judge's accuracy on the translations against each input's "
        "true label (compare with the ceiling); *transfer rate* the share of translations the domain judge calls "
        "domain 1; the *two-sample accuracy* is a fresh classifier telling real target images from the "
        "translations on held-out halves (0.5: indistinguishable, 1.0: trivially told apart) — the judge of "
        "realism that a colour wash cannot fool, since it is trained on the wash itself; *edge agreement* the "
        "correlation of input and output edge maps. FD / KID are in the domain judge's feature space (its conv "
        "blocks' channel statistics). The identity and tint rows need no training: a good translation beats "
        "identity on transfer and two-sample accuracy and beats the tint on two-sample accuracy, while keeping "
        "content near identity's.",
        "",
    ]
    for name, res in results.items():
        lines += task_section(name, res, out_dir, quick)
    return "\n".join(lines)
