"""Asset checks, evaluated inside the materialisation they judge (so they see its partition).

Blocking checks stop the stages after them in the same run: no training on an empty domain,
no velocity on a classifier that cannot tell the domains apart, no evaluation of a NaN flow, and
nothing after an evaluation that misses its transfer-rate or mask-IoU limit. A blocking check that
fails also fails its step, so the run shows as failed.
Limits come from the `thresholds` resource (environment variables in definitions.py).
Each spec carries the experiments partitions, so every evaluation is recorded with its partition
(the UI's partition column; a preview feature in Dagster 1.13, which warns once), and each result
names its partition in its metadata and description too, so several experiments' results read apart.
"""

import functools
import math
import warnings
from typing import Any

import dagster as dg

from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import CheckThresholds


def Spec(name: str, **kwargs) -> dg.AssetCheckSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.PreviewWarning)
        return dg.AssetCheckSpec(name, partitions_def=experiments_partitions, **kwargs)


def for_partition(results: list[dg.AssetCheckResult], partition: str) -> list[dg.AssetCheckResult]:
    """The results with `partition` in their metadata and at the head of their description."""
    if not partition:
        return results
    return [
        dg.AssetCheckResult(
            check_name=r.check_name,
            passed=r.passed,
            severity=r.severity,
            asset_key=r.asset_key,
            metadata={"partition": partition, **{k: v for k, v in r.metadata.items()}},
            description=f"partition '{partition}': " + (r.description or ("passed" if r.passed else "failed")),
        )
        for r in results
    ]


def _named(fn):
    """`partition=` on a check function: its results name the partition they judged."""

    @functools.wraps(fn)
    def wrapper(*args, partition: str = "", **kwargs):
        return for_partition(fn(*args, **kwargs), partition)

    return wrapper


MANIFEST_CHECKS = [
    Spec(
        "usable_frames",
        asset="media_manifest",
        blocking=True,
        description="each domain has at least `min_frames_per_domain` usable frames",
    ),
    Spec(
        "skip_rate",
        asset="media_manifest",
        blocking=True,
        description="the fraction of skipped (unreadable) rows is at most `max_skip_rate`",
    ),
]
SALIENCY_CHECKS = [
    Spec(
        "accuracy",
        asset="saliency_checkpoint",
        blocking=True,
        description="held-out accuracy reached the threshold (the config's, unless min_saliency_accuracy is set)",
    ),
]
VELOCITY_CHECKS = [
    Spec(
        "loss_finite",
        asset="velocity_checkpoint",
        blocking=True,
        description="every training step's loss was a finite number (a NaN/inf stops training: this check then "
        "fails with the step and the last good checkpoint, and no model is registered)",
    ),
]
EVALUATION_CHECKS = [
    Spec(
        "transfer_rate",
        asset="evaluation_samples",
        blocking=True,
        description="the judge assigns at least `min_transfer_rate` of the translations to domain 1",
    ),
    Spec(
        "mask_iou",
        asset="evaluation_samples",
        blocking=True,
        description="shapes stay put: IoU of output masks with the true masks is at least `min_mask_iou`",
    ),
]


@_named
def manifest_checks(
    counts: dict[tuple[int, str], int], generative: bool, t: CheckThresholds, manifest: str
) -> list[dg.AssetCheckResult]:
    """`counts`: distinct frames by (domain, status)."""
    min_frames, max_rate = t.value("min_frames_per_domain"), t.value("max_skip_rate")
    ok = {d: counts.get((d, "ok"), 0) for d in (0, 1)}
    failing = [d for d in ((1,) if generative else (0, 1)) if ok[d] < min_frames]
    total = sum(counts.values())
    skipped = sum(n for (_, s), n in counts.items() if s == "skipped")
    rate = skipped / total if total else 0.0
    return [
        dg.AssetCheckResult(
            check_name="usable_frames",
            passed=not failing,
            metadata={"domain0_ok": ok[0], "domain1_ok": ok[1], "min_frames_per_domain": min_frames},
            description=None
            if not failing
            else f"domain(s) {failing} have fewer than {min_frames} usable frames: add images, or see the "
            f"skipped rows with `rfp manifest summary {manifest}`",
        ),
        dg.AssetCheckResult(
            check_name="skip_rate",
            passed=rate <= max_rate,
            metadata={"skip_rate": rate, "skipped": skipped, "rows": total, "max_skip_rate": max_rate},
            description=None
            if rate <= max_rate
            else f"{skipped} of {total} rows could not be read; see `rfp manifest summary {manifest}`",
        ),
    ]


@_named
def saliency_checks(
    accuracy: float | None, config_threshold: float, t: CheckThresholds, skipped_reason: str | None = None
) -> list[dg.AssetCheckResult]:
    if skipped_reason is not None:
        return [
            dg.AssetCheckResult(
                check_name="accuracy", passed=True, metadata={"skipped": True}, description=skipped_reason
            )
        ]
    limit = t.value("min_saliency_accuracy")
    limit = limit if limit >= 0 else config_threshold
    return [
        dg.AssetCheckResult(
            check_name="accuracy",
            passed=accuracy is not None and accuracy >= limit,
            metadata={"accuracy": accuracy, "threshold": limit},
        )
    ]


@_named
def velocity_checks(final_loss: float) -> list[dg.AssetCheckResult]:
    finite = final_loss is not None and math.isfinite(final_loss)
    return [
        dg.AssetCheckResult(
            check_name="loss_finite", passed=finite, metadata={"final_loss": final_loss if finite else str(final_loss)}
        )
    ]


def non_finite_loss_check(message: str, step: int | None, last_checkpoint, partition: str) -> dg.AssetCheckResult:
    """The failed `loss_finite` result of a training stopped by a NaN/inf loss (velocity.NonFiniteLoss)."""
    return dg.AssetCheckResult(
        check_name="loss_finite",
        passed=False,
        description=message,
        metadata={
            "final_loss": "non-finite",
            "step": step if step is not None else -1,
            "partition": partition,
            "last_good_checkpoint": str(last_checkpoint) if last_checkpoint else "none written yet",
        },
    )


@_named
def evaluation_checks(metrics: dict[str, Any], t: CheckThresholds) -> list[dg.AssetCheckResult]:
    out = []
    for name, limit, absent in (
        ("transfer_rate", t.value("min_transfer_rate"), "no transfer rate (generative mode)"),
        ("mask_iou", t.value("min_mask_iou"), "no true masks for this experiment (set 'masks' in its file)"),
    ):
        value = metrics.get(name)
        if value is None:
            out.append(dg.AssetCheckResult(check_name=name, passed=True, description=absent))
        else:
            out.append(
                dg.AssetCheckResult(
                    check_name=name,
                    passed=float(value) >= limit,
                    metadata={name: round(float(value), 4), f"min_{name}": limit},
                )
            )
    return out
