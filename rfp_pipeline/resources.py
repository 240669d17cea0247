"""Resources: where state lives (RfpHome), MLflow tracking, check thresholds, manifest queries.

Empty (or unset) fields fall back to environment variables read at run time (so `RFP_HOME`,
`RFP_EXPERIMENTS_DIR`, `MLFLOW_TRACKING_URI`, `RFP_MIN_MASK_IOU`, ... set in a shell or a test
apply without reloading the code location), then to the project's defaults.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from rfp_core import experiments as exps
from rfp_core import paths, tracking
from rfp_core.config import ConfigError
from rfp_core.config_experiment import ExperimentConfig
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.hashing import HashCache

DEFAULT_UI_URL = "http://127.0.0.1:5000"  # `mlflow ui`'s own default address
# MLflow 3.17's UI picks GenAI or model-training pages from this query parameter (else its own
# stored choice, GenAI at first); the experimentKind tag (rfp_core.tracking) is what older 3.x read
ML_WORKFLOW = "workflowType=machine_learning"


def _env(value: str, var: str) -> str:
    return value or os.environ.get(var, "")


class RfpHome(dg.ConfigurableResource):
    """The state root, the experiments folder and the compute device."""

    home: str = Field(default="", description="state root; empty = $RFP_HOME or <project>/.rfp_home")
    project_root: str = Field(
        default="",
        description="relative paths in experiment files resolve here; empty = $RFP_PROJECT_ROOT or the checkout",
    )
    experiments_dir: str = Field(
        default="",
        description="folder of <name>.json experiment files; empty = $RFP_EXPERIMENTS_DIR or "
        "<project_root>/experiments",
    )
    device: str = Field(default="", description="cuda, mps or cpu; empty = $RFP_DEVICE or the best available")

    def home_path(self) -> Path:
        home = _env(self.home, "RFP_HOME")
        if not home:
            return paths.rfp_home()
        p = Path(home).expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p

    def root_path(self) -> Path:
        root = _env(self.project_root, "RFP_PROJECT_ROOT")
        return Path(root).expanduser().resolve() if root else paths.project_root()

    def experiments_path(self) -> Path:
        d = _env(self.experiments_dir, "RFP_EXPERIMENTS_DIR")
        return Path(d).expanduser().resolve() if d else self.root_path() / "experiments"

    def experiment_files(self) -> dict[str, Path]:
        return exps.experiment_files(self.experiments_path())

    def experiment_file(self, name: str) -> Path:
        path = self.experiments_path() / f"{name}.json"
        if not path.exists():
            raise ConfigError(
                f"experiment '{name}' has no file {path}; restore it, or delete the partition "
                "(the experiments sensor removes partitions whose file is gone)"
            )
        return path

    def load_experiment(self, name: str) -> ExperimentConfig:
        return exps.load(self.experiment_file(name), self.root_path())

    def out_dir(self, name: str, *parts: str) -> Path:
        """Per-partition outputs: $RFP_HOME/pipeline/<experiment>/<parts...>."""
        d = self.home_path().joinpath("pipeline", name, *parts)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def frame_store(self, max_side: int) -> FrameStore:
        return FrameStore(root=self.home_path() / "store", max_side=max_side)

    def hash_cache(self, name: str = "hash_cache.parquet") -> HashCache:
        return HashCache(self.home_path() / "cache" / name)

    def embedding_cache(self, encoder_id: str):
        """Structure embeddings of one encoder, shared by every experiment (keys are content hashes)."""
        from rfp_core.structure.cache import EmbeddingCache

        return EmbeddingCache(encoder_id, self.home_path() / "cache" / "embeddings" / f"{encoder_id}.parquet")

    def resolve_device(self) -> str:
        dev = _env(self.device, "RFP_DEVICE")
        from rfp_core.device import pick_device

        return str(pick_device(dev or None))


class MlflowTracking(dg.ConfigurableResource):
    """MLflow: one MLflow experiment (and one registered model) per pipeline experiment."""

    tracking_uri: str = Field(default="", description="empty = $MLFLOW_TRACKING_URI or sqlite:///$RFP_HOME/mlflow.db")
    artifact_root: str = Field(
        default="",
        description="where new MLflow experiments keep artifacts; empty = $RFP_HOME/mlartifacts, or for a tracking "
        "server (http[s] URI) the server's own --artifacts-destination, uploaded through it",
    )
    ui_url: str = Field(
        default="",
        description="base URL of `mlflow ui` for the run links in Dagster's metadata, read when a stage materialises "
        "(the link is stored with it); empty = $MLFLOW_UI_URL or http://127.0.0.1:5000",
    )

    def uri(self) -> str:
        return tracking.tracking_uri(self.tracking_uri)

    def is_server(self) -> bool:
        return tracking.is_server(self.uri())

    def _artifact_location(self, name: str) -> str | None:
        return tracking.artifact_location(name, self.uri(), self.artifact_root)

    def client(self):
        import mlflow

        mlflow.set_tracking_uri(self.uri())
        return mlflow.MlflowClient(self.uri())

    def experiment_id(self, name: str) -> str:
        return tracking.experiment_id(name, self.tracking_uri, self.artifact_root)

    @contextlib.contextmanager
    def start_run(
        self, experiment: str, run_name: str, tags: dict[str, Any], manifest: tuple[Path, str] | None = None
    ) -> Iterator[Any]:
        """`with tracking.start_run(exp, name, tags) as run:` an active MLflow run; ended (FAILED on error) on exit.
        System metrics are sampled while it runs when psutil is installed; `manifest` = (parquet, content
        version) is logged as its training dataset (rfp_core.tracking)."""
        with tracking.start_run(
            experiment, run_name, tags, self.tracking_uri, self.artifact_root, manifest=manifest
        ) as run:
            yield run

    @contextlib.contextmanager
    def resume_run(self, run_id: str) -> Iterator[Any]:
        import mlflow

        self.client()
        with mlflow.start_run(run_id=run_id) as run:
            yield run

    def log_translator(
        self,
        checkpoint: Path,
        registered_name: str,
        tags: dict[str, str] | None = None,
        distilled: Path | None = None,
    ) -> tuple[str, str | None]:
        """Log the pyfunc translator (the final checkpoint as its artifact: one MLflow logged model
        per final checkpoint) in the active run and register a version under `registered_name`;
        `tags` (partition, data versions) go on both the logged model and the version. With
        `distilled`, the one-step map travels as a second artifact and serves `steps` 1.
        Returns (model URI, registered version)."""
        import importlib.metadata as md

        import mlflow

        from rfp_pipeline import pyfunc_model

        def pin(pkg: str) -> str:
            try:
                return f"{pkg}=={md.version(pkg).split('+')[0]}"
            except md.PackageNotFoundError:
                return pkg

        info = mlflow.pyfunc.log_model(
            name="translator",
            python_model=Path(pyfunc_model.__file__),
            artifacts={
                pyfunc_model.CHECKPOINT: str(checkpoint),
                **({pyfunc_model.DISTILLED: str(distilled)} if distilled else {}),
            },
            code_paths=[str(Path(paths.PACKAGE_DIR))],  # rfp_core travels with the model
            signature=pyfunc_model.SIGNATURE,
            # the documented request format, in the UI and serving_input_example.json
            input_example=pyfunc_model.input_example(),
            # explicit: MLflow's requirement inference would load the model in a subprocess
            pip_requirements=[
                pin(p) for p in ("torch", "torchvision", "numpy", "pillow", "pydantic", "pyarrow", "tqdm")
            ],
            registered_model_name=registered_name,
            tags=tags or None,
        )
        version = getattr(info, "registered_model_version", None)
        if version is not None:
            client = self.client()
            for key, value in (tags or {}).items():
                client.set_model_version_tag(registered_name, str(version), key, str(value))
        return info.model_uri, None if version is None else str(version)

    def ui_base(self) -> str:
        return (_env(self.ui_url, "MLFLOW_UI_URL") or DEFAULT_UI_URL).rstrip("/")

    def run_url(self, run: Any) -> str:
        """The run's page under `ui_base()` as it is now: Dagster stores the link with the
        materialisation, so a UI moved to another address later needs a re-materialisation.
        MLflow 3 opens on its GenAI pages unless told the workflow (`?workflowType=`)."""
        return f"{self.ui_base()}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?{ML_WORKFLOW}"

    def experiment_url(self, experiment_id: str) -> str:
        """The experiment's training-runs table (not the GenAI overview MLflow 3 opens by default)."""
        return f"{self.ui_base()}/#/experiments/{experiment_id}?{ML_WORKFLOW}"


# check limit -> (the environment variable an unset field falls back to, the default)
THRESHOLD_ENV = {
    "max_skip_rate": ("RFP_MAX_SKIP_RATE", 0.2),
    "min_frames_per_domain": ("RFP_MIN_FRAMES_PER_DOMAIN", 2),
    "min_saliency_accuracy": ("RFP_MIN_SALIENCY_ACCURACY", -1.0),
    "min_transfer_rate": ("RFP_MIN_TRANSFER_RATE", 0.9),
    "min_mask_iou": ("RFP_MIN_MASK_IOU", 0.8),
}


def _unset(name: str) -> str:
    var, default = THRESHOLD_ENV[name]
    return f"; unset = ${var} or {default}"


class CheckThresholds(dg.ConfigurableResource):
    """Limits the asset checks apply (set in the launchpad; unset ones read their environment
    variable when a check runs). Read them with `value(name)`."""

    max_skip_rate: float | None = Field(
        default=None, description="largest allowed fraction of skipped manifest rows" + _unset("max_skip_rate")
    )
    min_frames_per_domain: int | None = Field(
        default=None, description="fewest usable frames each domain must have" + _unset("min_frames_per_domain")
    )
    min_saliency_accuracy: float | None = Field(
        default=None,
        description="held-out accuracy the saliency classifier must reach; < 0 = the config's accuracy_threshold"
        + _unset("min_saliency_accuracy"),
    )
    min_transfer_rate: float | None = Field(
        default=None,
        description="evaluation: fraction of outputs the judge assigns to domain 1" + _unset("min_transfer_rate"),
    )
    min_mask_iou: float | None = Field(
        default=None,
        description="evaluation: IoU of input and output shape masks (content kept)" + _unset("min_mask_iou"),
    )

    def value(self, name: str) -> float:
        """The limit `name`: the field when set, else its environment variable, else the default."""
        set_value = getattr(self, name)
        if set_value is not None:
            return set_value
        var, default = THRESHOLD_ENV[name]
        raw = os.environ.get(var, "").strip()
        value = float(raw) if raw else default
        return int(value) if isinstance(default, int) else value


class ManifestDuckDB(DuckDBResource):
    """DuckDB for the manifest queries; an empty `database` is $RFP_DUCKDB (a file keeps views
    between queries), read when a query runs, else an in-memory database."""

    database: str = Field(default="", description="DuckDB database file; empty = $RFP_DUCKDB or ':memory:'")

    @contextlib.contextmanager
    def get_connection(self):
        database = _env(self.database, "RFP_DUCKDB") or ":memory:"
        with DuckDBResource(database=database, connection_config=self.connection_config).get_connection() as con:
            yield con
