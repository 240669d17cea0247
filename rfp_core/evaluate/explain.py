"""What each evaluation number means, and the numbers rounded for people (the files keep full precision).

`evaluate_run` writes these keys to metrics.json; the Dagster metadata shows them rounded with
this text beside them, so `fid_judge_floor` is not a riddle. Realism keys are built per feature
space (`fid_<space>`, `kid_<space>_floor`): they are explained by pattern.
"""

from __future__ import annotations

import math
from typing import Any

SIGNIFICANT = 4

NOTES: dict[str, str] = {
    "transfer_rate": "fraction of translations the judge (a classifier trained afresh on real held-out frames) calls domain 1; higher = the style changed",
    "judge_accuracy": "the judge's accuracy on real held-out frames of both domains: how far its verdicts can be trusted",
    "judge_real_domain0_as_domain1": "fraction of untranslated domain-0 inputs the judge calls domain 1: the transfer rate of doing nothing",
    "structure_similarity": "cosine similarity of input and output structure embeddings (1 = same layout)",
    "mask_count": "held-out inputs with a true shape mask",
    "mask_iou": "IoU of the shapes found in the outputs with the true masks: content kept (1 = exactly)",
    "mask_iou_input": "the same IoU on the inputs: about 1 says the shape finder itself is right",
    "straightness": "mean squared gap between the velocity and the straight line from start to end of each path (0 = straight; straighter flows need fewer steps)",
    "nfe": "velocity evaluations per image for the steps and sampler used",
    "ms_per_image": "milliseconds per translated image (the whole held-out batch, after a warm-up)",
    "cycle_error": "mean absolute difference, in [-1, 1] units, between an input and its translation translated back (0 = perfect round trip)",
    "steps": "ODE steps used for sampling",
    "n_eval": "held-out domain-0 frames translated (all of them are in the grid)",
    "n_real_domain1": "held-out real domain-1 frames the outputs are compared with",
    "judge_n_train": "frames the judge trained on",
    "judge_n_holdout": "frames the judge was scored on",
    "generated": "images generated from noise (generative mode)",
}
_PATTERNS = (
    ("fid_", "_floor", "Fréchet distance of real domain-1 frames (not held out) to the held-out ones, in {space} features: what a perfect translator would score at this sample size"),
    ("kid_", "_floor", "kernel distance (KID) of real domain-1 frames to the held-out ones, in {space} features: the floor for kid_{space}"),
    ("fid_", "", "Fréchet distance of the outputs to real held-out domain-1 frames in {space} features (lower = more realistic; compare with fid_{space}_floor)"),
    ("kid_", "", "kernel distance (KID, unbiased, may dip below 0) of the outputs to real held-out domain-1 frames in {space} features; compare with kid_{space}_floor"),
)


def note(key: str) -> str:
    if key in NOTES:
        return NOTES[key]
    for prefix, suffix, text in _PATTERNS:
        if key.startswith(prefix) and key.endswith(suffix):
            space = key[len(prefix):len(key) - len(suffix)] if suffix else key[len(prefix):]
            if space and "_" not in space:
                return text.format(space=space)
    return ""


def rounded(value: float, digits: int = SIGNIFICANT) -> float:
    """`value` to `digits` significant digits (integers stay integers)."""
    if isinstance(value, int) or not math.isfinite(value) or value == 0:
        return value
    return round(value, max(0, digits - 1 - int(math.floor(math.log10(abs(value))))))


def markdown_table(metrics: dict[str, Any]) -> str:
    """| metric | value | meaning | for every number in `metrics`, rounded, in its order."""
    lines = ["| metric | value | what it says |", "|---|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        shown = "n/a" if isinstance(value, float) and not math.isfinite(value) else f"{rounded(value):g}"
        lines.append(f"| `{key}` | {shown} | {note(key)} |")
    return "\n".join(lines)
