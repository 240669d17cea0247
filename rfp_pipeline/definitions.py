"""The one place that assembles the Dagster code location (`dagster dev -w workspace.yaml`, `dg dev`)."""

from __future__ import annotations

import dagster as dg

from rfp_pipeline.assets import assets
from rfp_pipeline.pipes import TrainingLauncher
from rfp_pipeline.resources import CheckThresholds, ManifestDuckDB, MlflowTracking, RfpHome
from rfp_pipeline.sensors import sensors
from rfp_pipeline.stage_records import STAGE_RECORDS, stage_records


def default_resources() -> dict[str, object]:
    """Resources whose unset fields read their environment variables when a run uses them (not at
    import); tests pass their own to `materialize`."""
    return {
        "rfp": RfpHome(),
        # each stage's result.json record, handed to the assets that read it as their inputs
        STAGE_RECORDS: stage_records,
        "mlflow_tracking": MlflowTracking(),
        # where training phases run: this process, or a Pipes subprocess ($RFP_TRAINING_LAUNCHER=pipes)
        "training_launcher": TrainingLauncher(),
        # manifest queries run on parquet files; $RFP_DUCKDB names a file to keep views between queries
        "duckdb": ManifestDuckDB(),
        # check limits: $RFP_MAX_SKIP_RATE, $RFP_MIN_FRAMES_PER_DOMAIN, ... (resources.THRESHOLD_ENV)
        "thresholds": CheckThresholds(),
    }


defs = dg.Definitions(
    assets=assets,
    sensors=sensors,
    resources=default_resources(),
)
