"""`python -m rfp_pipeline.demo` (`make demo`): the demo experiment end to end in the real instance.

Generates the demo data when missing, registers the `demo` partition in the instance at
$DAGSTER_HOME (default: the project's dagster_home/), materialises the whole graph for it, so
the runs show in `dagster dev` afterwards, and prints where the results are. While it runs, each
stage is printed as it starts and ends (its time and key figures, each check's verdict) and a
training stage shows a progress bar (`run_progress.RunProgress`: the run's event log and the
metrics it logs to MLflow). The last line printed is the path of the evaluation's metrics.json.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, TextIO

DEMO = "demo"


def _setup_env(root: Path) -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(root / "dagster_home"))).resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return home


def run_graph(
    instance,
    resources: dict[str, Any],
    partition: str,
    cfg=None,
    run_config: dict | None = None,
    out: TextIO = sys.stderr,
    tags: dict[str, str] | None = None,
):
    """Materialise every asset for `partition` in `instance`, printing each stage to `out` as it
    runs. Dagster's own console logger stays at WARNING: the progress lines say what it would."""
    import dagster as dg

    from rfp_pipeline.assets import assets
    from rfp_pipeline.run_progress import RunProgress, training_totals

    token = uuid.uuid4().hex
    run_config = {**(run_config or {}), "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    progress = RunProgress(
        instance,
        ("rfp/progress", token),
        experiment=partition,
        tracking_uri=resources["mlflow_tracking"].uri(),
        totals=training_totals(cfg) if cfg else None,
        out=out,
    )
    with progress:
        result = dg.materialize(
            assets,
            instance=instance,
            resources=resources,
            partition_key=partition,
            tags={**(tags or {}), "rfp/progress": token},
            run_config=run_config,
            raise_on_error=False,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    from rfp_core.paths import project_root, rfp_home

    root = project_root()
    dagster_home = _setup_env(root)

    import dagster as dg

    from rfp_core import experiments as exps
    from rfp_pipeline.definitions import default_resources
    from rfp_pipeline.partitions import EXPERIMENTS

    resources = default_resources()
    rfp = resources["rfp"]
    exp = rfp.load_experiment(DEMO)  # a clear error if experiments/demo.json or its config is missing
    demo_root = Path(exp.domain1[0]).parent
    try:
        from rfp_core.media.demo_data import make_demo_data
    except ImportError:
        make_demo_data = None
    if make_demo_data is not None:
        data = make_demo_data(demo_root)
        print(f"demo data {'created' if data.created else 'present'}: {demo_root}", file=sys.stderr)
    elif not demo_root.exists():
        print(f"error: {demo_root} is missing and rfp_core.media.demo_data is not available", file=sys.stderr)
        return 2

    instance = dg.DagsterInstance.get()
    if not instance.has_dynamic_partition(EXPERIMENTS, DEMO):
        instance.add_dynamic_partitions(EXPERIMENTS, [DEMO])
    print(f"materialising the whole graph for '{DEMO}' in the Dagster instance at {dagster_home} ...", file=sys.stderr)
    cfg = exps.model_config(exps.resolved_spec(exp, rfp.root_path()))
    result = run_graph(instance, resources, DEMO, cfg=cfg, tags={"rfp/source": "demo"})
    if not result.success:
        print("error: the demo run failed; open the run in `dagster dev` for the step logs", file=sys.stderr)
        return 1

    out = rfp.out_dir(DEMO)
    vel = json.loads((out / "velocity" / "result.json").read_text())
    ev = json.loads((out / "evaluation" / "result.json").read_text())
    metrics = json.loads(Path(ev["metrics"]).read_text())
    tracking = resources["mlflow_tracking"].uri()
    print(f"\nrun {result.run_id} succeeded; outputs under {out}")
    print("grids:")
    print(f"  training samples (inputs above, outputs below): {vel.get('sample_grid')}")
    for name, path in ev["grids"].items():
        print(f"  evaluation {name.removeprefix('grid_')}: {path}")
    shown = {
        k: metrics[k]
        for k in ("transfer_rate", "mask_iou", "cycle_error", "straightness", "ms_per_image")
        if k in metrics
    }
    print("metrics: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    print(
        f"registered model: models:/{DEMO}/{vel.get('model_version')} (mlflow.pyfunc.load_model; "
        f"{vel.get('model_uri')})"
    )
    print("\nopen the UIs (from the project root):")
    print(
        f"  Dagster: DAGSTER_HOME={dagster_home} RFP_HOME={rfp_home()} .venv/bin/dagster dev -w workspace.yaml"
        "   -> http://127.0.0.1:3000"
    )
    ui = resources["mlflow_tracking"].ui_base()  # the address the run links in Dagster were written with
    port = urllib.parse.urlsplit(ui).port or 5000
    print(f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {tracking} --port {port}   -> {ui}")
    print(ev["metrics"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
