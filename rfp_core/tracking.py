"""MLflow tracking shared by `rfp train` and the Dagster pipeline (the original tracked in wandb).

The store is $MLFLOW_TRACKING_URI, else the sqlite file under $RFP_HOME; new experiments keep
their artifacts under $RFP_HOME/mlartifacts (MLflow's own default is ./mlruns of whatever folder
the process started in).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from rfp_core import paths

LogFn = Callable[[dict, int], None]
# MLflow 3 opens an experiment without this tag in its GenAI view (traces, an assistant panel); this
# value (the UI's CUSTOM_MODEL_DEVELOPMENT kind) opens it on the training-runs table
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(explicit: str = "") -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{paths.rfp_home() / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_location(name: str, uri: str, explicit_root: str = "") -> str | None:
    """A file URI under our artifact root; None (the server decides) for a tracking server, whose
    clients may run on other machines: a local path there would be unreadable from the UI."""
    if is_server(uri) and not explicit_root:
        return None
    root = Path(explicit_root or str(paths.rfp_home() / "mlartifacts")).expanduser().resolve()
    return (root / name).as_uri()


def experiment_id(name: str, uri: str = "", artifacts: str = "") -> str:
    """Get or create the MLflow experiment `name` (restoring it if it was deleted in the UI)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    client = mlflow.MlflowClient(tracking_uri(uri))
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if EXPERIMENT_KIND[0] not in found.tags:  # made before the tag was set, or by hand
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(name, tracking_uri(uri), artifacts),
                                        tags=dict([EXPERIMENT_KIND]))
    except mlflow.exceptions.MlflowException:  # another process created it between lookup and create
        return client.get_experiment_by_name(name).experiment_id


def system_metrics_available() -> bool:
    """MLflow samples CPU, memory, disk and network through psutil (the optional `system-metrics`
    extra), GPUs through pynvml when it is installed too; without psutil nothing is sampled."""
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def log_manifest_input(manifest: str | Path, digest: str, name: str) -> Any:
    """The manifest parquet as the active run's training input: an MLflow dataset whose digest is
    the manifest's content version (what the pipeline's data versions are), not a hash of its bytes.
    MLflow keeps 36 characters of a digest: the full version goes into the input's tag."""
    import mlflow
    import pyarrow.parquet as pq

    df = pq.read_table(manifest).to_pandas()
    dataset = mlflow.data.from_pandas(df, source=Path(manifest).resolve().as_uri(), name=name, digest=digest[:36])
    mlflow.log_input(dataset, context="training", tags={"content_version": digest})
    return dataset


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, tags: dict[str, Any], uri: str = "", artifacts: str = "",
              manifest: tuple[str | Path, str] | None = None) -> Iterator[Any]:
    """An active MLflow run; ended (FAILED on error) on exit. System metrics are sampled while it
    is open when psutil is installed. `manifest` = (parquet path, content version): logged as the
    run's training dataset."""
    import mlflow

    exp = experiment_id(experiment, uri, artifacts)
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags={k: str(v) for k, v in tags.items()},
                          log_system_metrics=system_metrics_available()) as run:
        if manifest is not None:
            log_manifest_input(manifest[0], manifest[1], f"{experiment}-manifest")
        yield run


def metric_logger(prefix: str = "") -> LogFn:
    """A `log(metrics, step)` callback for the training phases that writes to the active run."""
    import mlflow

    def log(metrics: dict, step: int) -> None:
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=step)

    return log
