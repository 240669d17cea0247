"""Evaluation: pure metrics, the independent judge, and `evaluate_run` (metrics.json + grids)."""

from rfp_core.evaluate.judge import Judge, JudgeNet, train_judge
from rfp_core.evaluate.metrics import (
    cosine_similarity,
    cycle_error,
    foreground_mask,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    mask_iou,
    mask_ious,
    stripe_energy,
)
from rfp_core.evaluate.report import evaluate_run

__all__ = [
    "Judge",
    "JudgeNet",
    "train_judge",
    "cosine_similarity",
    "cycle_error",
    "foreground_mask",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kid",
    "mask_iou",
    "mask_ious",
    "stripe_energy",
    "evaluate_run",
]
