"""The one place that assembles the Dagster code location (`dagster dev -w workspace.yaml`, `dg dev`)."""

from __future__ import annotations

import os

import dagster as dg
from dagster_duckdb import DuckDBResource

from rfp_pipeline.assets import assets
from rfp_pipeline.pipes import TrainingLauncher
from rfp_pipeline.resources import CheckThresholds, MlflowTracking, RfpHome
from rfp_pipeline.sensors import sensors
from rfp_pipeline.stage_records import STAGE_RECORDS, stage_records


def _float_env(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def default_resources() -> dict[str, object]:
    """Resources with their environment fallbacks; tests pass their own to `materialize`."""
    return {
        "rfp": RfpHome(),
        # each stage's result.json record, handed to the assets that read it as their inputs
        STAGE_RECORDS: stage_records,
        "mlflow_tracking": MlflowTracking(),
        # where training phases run: this process, or a Pipes subprocess ($RFP_TRAINING_LAUNCHER=pipes)
        "training_launcher": TrainingLauncher(),
        # manifest queries run on parquet files; set RFP_DUCKDB to a file to keep views between queries
        "duckdb": DuckDBResource(database=os.environ.get("RFP_DUCKDB", ":memory:")),
        "thresholds": CheckThresholds(
            max_skip_rate=_float_env("RFP_MAX_SKIP_RATE", 0.2),
            min_frames_per_domain=int(_float_env("RFP_MIN_FRAMES_PER_DOMAIN", 2)),
            min_saliency_accuracy=_float_env("RFP_MIN_SALIENCY_ACCURACY", -1.0),
            min_transfer_rate=_float_env("RFP_MIN_TRANSFER_RATE", 0.9),
            min_mask_iou=_float_env("RFP_MIN_MASK_IOU", 0.8),
        ),
    }


defs = dg.Definitions(
    assets=assets,
    sensors=sensors,
    resources=default_resources(),
)
