"""What every training asset shares: its decorator, its set-up and its MLflow run.

Each training materialisation writes into `$RFP_HOME/pipeline/<exp>/<stage>/<key>/`, `key` a
digest of what it is built from: a Dagster retry (same inputs) resumes there, new inputs start
afresh. `<stage>/result.json` is the record the next stages receive as their input; older keys
beyond the last two are pruned.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import dagster as dg

from rfp_core import experiments as exps
from rfp_core.config import ModelConfig
from rfp_core.media.manifest import content_version
from rfp_pipeline.assets.ingest import manifest_path
from rfp_pipeline.automation import on_retrain_cron
from rfp_pipeline.metadata import run_tags
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import MlflowTracking, RfpHome
from rfp_pipeline.stage_records import STAGE, STAGE_RECORDS

GROUP = "training"


def training_asset(stage: str, code_version: str, description: str, **extra: Any) -> Callable:
    """`@dg.asset` as every training stage is declared: partitioned by experiment, on the retraining
    cron, one at a time on the GPU pool, its record (in `<stage>/`) handed on as the next stages' input."""
    return dg.asset(
        partitions_def=experiments_partitions,
        group_name=GROUP,
        code_version=code_version,
        kinds={"pytorch", "mlflow"},
        automation_condition=on_retrain_cron(),
        pool="gpu",
        io_manager_key=STAGE_RECORDS,
        metadata={STAGE: stage},
        description=description,
        **extra,
    )


def _locked_db(exc: BaseException | None) -> bool:
    # MLflow wraps sqlalchemy, which wraps sqlite3: look down the chain
    while exc is not None:
        if isinstance(exc, sqlite3.OperationalError) or "database is locked" in str(exc):
            return "locked" in str(exc)
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def transient_retry() -> Iterator[None]:
    """Out of GPU memory (another process on the card) or a locked sqlite tracking store: retry
    later, resuming from the stage folder. Everything else (bad data, an unreachable threshold)
    fails at once with its own message: retrying would only repeat it."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise dg.RetryRequested(max_retries=2, seconds_to_wait=60) from exc
    except Exception as exc:
        if not _locked_db(exc):
            raise
        raise dg.RetryRequested(max_retries=3, seconds_to_wait=10) from exc


def _mlflow_logger(mlflow_mod):
    def log(metrics: dict[str, float], step: int) -> None:
        mlflow_mod.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    return log


class Manifest(NamedTuple):
    """The manifest a stage trains on (from its `frame_store` input) and its content version."""

    path: Path
    version: str


@dataclass(frozen=True)
class TrainingStage:
    """One training materialisation: the experiment (from the `experiment_config` input), its
    model config, its folders and frames, and its MLflow run."""

    context: dg.AssetExecutionContext
    rfp: RfpHome
    stage: str
    spec: dict

    @cached_property
    def cfg(self) -> ModelConfig:
        return exps.model_config(self.spec)

    @property
    def name(self) -> str:
        return self.context.partition_key

    @cached_property
    def spec_version(self) -> str:
        return exps.spec_digest(self.spec)

    @property
    def stage_dir(self) -> Path:
        return self.rfp.out_dir(self.name, self.stage)

    def out_dir(self, key: str) -> Path:
        return self.rfp.out_dir(self.name, self.stage, key)

    def manifest(self, frame_store: dict) -> Manifest:
        path = manifest_path(frame_store)
        return Manifest(path, content_version(path))

    @contextlib.contextmanager
    def mlflow_run(self, tracking: MlflowTracking, manifest: Manifest, **tags: Any) -> Iterator[Any]:
        """The stage's MLflow run (a transient failure inside it asks Dagster to retry), tagged with
        the Dagster run and the inputs' versions, the experiment's config logged into it."""
        import mlflow

        tags = run_tags(
            self.context, stage=self.stage, input_data_version=manifest.version, spec_version=self.spec_version, **tags
        )
        with (
            transient_retry(),
            tracking.start_run(self.name, f"{self.stage} {self.name}", tags, manifest=manifest) as run,
        ):
            mlflow.log_params(self.cfg.flat_params())
            mlflow.log_dict(self.spec, "config/experiment.json")
            mlflow.log_text(self.cfg.to_json(), "config/model_config.json")
            yield run

    def launch_args(self, tracking: MlflowTracking, run: Any) -> dict[str, Any]:
        """What every `training_launcher.train_*` call takes besides its phase's own inputs: the phase
        runs in this process, or out of it through Dagster Pipes ($RFP_TRAINING_LAUNCHER)."""
        import mlflow

        return {
            "device": self.rfp.resolve_device(),
            "store": self.rfp.frame_store(self.cfg.store_max_side),
            "log": _mlflow_logger(mlflow),
            "mlflow_uri": tracking.uri(),
            "mlflow_run_id": run.info.run_id,
        }
