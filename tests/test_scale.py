"""Scaling out: the Dagster instance (dagster-postgres) and an MLflow tracking server, both on a private
PostgreSQL server, switched by environment variables only. `make test-scale` runs the slow part
(it installs PostgreSQL from the OS packages when it is missing); the config checks here are fast."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import psycopg2
import pytest
from dagster._serdes import deserialize_value
from scale_servers import ROOT, free_port, mlflow_server, postgres
from test_pipeline import RUN_CONFIG, STAGES, TINY_OVERRIDES, make_project, register_partitions, resources_for

from rfp_pipeline.assets import assets
from rfp_pipeline.resources import MlflowTracking

PG_HOME = ROOT / "dagster_home_pg"


def pg_instance_home(folder: Path) -> Path:
    """An instance folder holding the project's own dagster_home_pg/dagster.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PG_HOME / "dagster.yaml", folder / "dagster.yaml")
    return folder


def sql(url: str, query: str, *args) -> list[tuple]:
    """Rows straight from the database (libpq takes the URL without SQLAlchemy's driver part)."""
    conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall()
    finally:
        conn.close()


def make_vars(**env: str) -> dict[str, str]:
    """The variables `make` exports with `env` set (its database, without running a recipe)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_UI_URL")}
    out = subprocess.run(
        ["make", "-pn", "-f", str(ROOT / "Makefile"), "setup"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**clean, "RFP_HOME": "/tmp/rfp-home", **env},
    ).stdout
    found = {}
    for line in out.splitlines():
        for op in (" := ", " = "):
            name, sep, value = line.partition(op)
            if sep and name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_UI_URL") and name not in found:
                found[name] = value.replace("$(MLFLOW_PORT)", "5001").replace("$(RFP_HOME)", "/tmp/rfp-home")
    return found


# ------------------------------------------------------------------------------------------ fast
def test_pg_instance_yaml_takes_the_url_from_the_environment():
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(PG_HOME))
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "RFP_POSTGRES_URL"}}}
    sqlite_config, _ = dagster_instance_config(str(ROOT / "dagster_home"))
    assert "storage" not in sqlite_config  # the default instance stays on sqlite
    assert config["concurrency"]["pools"] == sqlite_config["concurrency"]["pools"]  # one training per GPU pool


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_switches_stores_by_environment_variables():
    plain = make_vars()
    assert plain["DAGSTER_HOME"] == str(ROOT / "dagster_home")
    assert plain["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/rfp-home/mlflow.db"
    scaled = make_vars(
        RFP_POSTGRES_URL="postgresql+psycopg2://u@127.0.0.1:5433/d",
        RFP_MLFLOW_BACKEND_URI="postgresql+psycopg2://u@127.0.0.1:5433/m",
    )
    assert scaled["DAGSTER_HOME"] == str(PG_HOME)
    assert scaled["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5001"
    assert scaled["MLFLOW_UI_URL"] == "http://127.0.0.1:5001"
    # a URL without the driver stops make with the fix in the message
    bad = subprocess.run(
        ["make", "-n", "setup"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "RFP_POSTGRES_URL": "postgresql://u@h/d"},
    )
    assert bad.returncode != 0 and "RFP_POSTGRES_URL must name the driver: postgresql+psycopg2://" in bad.stderr
    # an explicit tracking URI wins
    pinned = make_vars(RFP_MLFLOW_BACKEND_URI="postgresql+psycopg2://m", MLFLOW_TRACKING_URI="http://h:9")
    assert pinned["MLFLOW_TRACKING_URI"] == "http://h:9"


def test_tracking_server_keeps_artifacts_where_it_says(tmp_path):
    server = MlflowTracking(tracking_uri="http://127.0.0.1:5001")
    assert server.is_server() and server._artifact_location("alpha") is None
    pinned = MlflowTracking(tracking_uri="http://127.0.0.1:5001", artifact_root=str(tmp_path))
    assert pinned._artifact_location("alpha") == (tmp_path / "alpha").as_uri()
    local = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert not local.is_server() and local._artifact_location("a").endswith("/mlartifacts/a")


# ------------------------------------------------------------------------------------------ slow
@pytest.fixture(scope="module")
def pg():
    with postgres("rfp_dagster", "rfp_mlflow") as base:
        # SQLAlchemy URLs, naming the driver as the Makefile asks
        base = base.replace("postgresql://", "postgresql+psycopg2://")
        yield {"dagster": f"{base}/rfp_dagster", "mlflow": f"{base}/rfp_mlflow"}


@pytest.fixture(scope="module")
def built(pg, tmp_path_factory):
    """One tiny experiment, the whole graph materialised: Dagster instance and MLflow server on Postgres."""
    base = tmp_path_factory.mktemp("scale")
    root, home, artifacts = base / "project", base / "rfp_home", base / "mlartifacts"
    with mlflow_server(pg["mlflow"], artifacts, base / "mlflow.log") as uri, pytest.MonkeyPatch.context() as mp:
        mp.setenv("RFP_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("RFP_POSTGRES_URL", pg["dagster"])
        make_project(root, {"alpha": TINY_OVERRIDES})
        resources = resources_for(root, home, uri)
        resources["mlflow_tracking"] = MlflowTracking(tracking_uri=uri)  # the server keeps the artifacts
        dagster_home = pg_instance_home(base / "dagster_home")
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            register_partitions(instance, resources)
            result = dg.materialize(
                assets, instance=instance, resources=resources, partition_key="alpha", run_config=RUN_CONFIG
            )
        yield {"home": home, "uri": uri, "artifacts": artifacts, "dagster_home": dagster_home, "result": result}


@pytest.mark.slow
@pytest.mark.scale
def test_dagster_runs_and_event_logs_live_in_postgres(built, pg):
    assert built["result"].success
    run_id = built["result"].run_id
    # a fresh instance on the same database sees what the first one wrote
    with dg.DagsterInstance.from_config(str(built["dagster_home"])) as instance:
        kinds = {
            type(s).__name__ for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
        }
        assert kinds == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": "alpha"}))
        assert [(r.run_id, r.status) for r in runs] == [(run_id, dg.DagsterRunStatus.SUCCESS)]
        assert instance.get_dynamic_partitions("experiments") == ["alpha"]
        for stage in STAGES:
            event = instance.get_latest_materialization_event(dg.AssetKey(stage))
            assert event is not None and event.run_id == run_id, stage
            assert event.asset_materialization.partition == "alpha"
        velocity = instance.get_latest_materialization_event(dg.AssetKey("velocity_checkpoint")).asset_materialization
        assert np.isfinite(velocity.metadata["final_loss"].value)
        assert velocity.metadata["registered_model"].value == "models:/alpha/1"
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("velocity_checkpoint"), "loss_finite")]
        )
        assert [c.status.value for c in checks.values()] == ["SUCCEEDED"]
    # the rows are in Postgres, and no sqlite file was written instead
    mats = sql(
        pg["dagster"],
        "SELECT asset_key FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
        run_id,
        "ASSET_MATERIALIZATION",
    )
    assert sorted(json.loads(k)[0] for (k,) in mats) == sorted(STAGES)
    assert sql(pg["dagster"], "SELECT status FROM runs WHERE run_id = %s", run_id) == [("SUCCESS",)]
    assert not (built["dagster_home"] / "history").exists() and not (built["dagster_home"] / "schedules").exists()


@pytest.mark.slow
@pytest.mark.scale
def test_mlflow_runs_models_and_artifacts_live_on_the_server(built, pg):
    uri, run_id = built["uri"], built["result"].run_id
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("alpha")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied: no client-side path
    runs = {
        r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id], f"tags.dagster_run_id = '{run_id}'")
    }
    assert sorted(runs) == ["saliency", "velocity"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    vel = runs["velocity"]
    assert len(client.get_metric_history(vel.info.run_id, "velocity/loss")) >= 2
    assert "config/model_config.json" in {a.path for a in client.list_artifacts(vel.info.run_id, "config")}
    # the artifacts went through the server into its --artifacts-destination
    on_disk = {p.relative_to(built["artifacts"]).parts[1] for p in built["artifacts"].rglob("model_config.json")}
    assert on_disk == {r.info.run_id for r in runs.values()}  # <exp id>/<run id>/artifacts/config/...
    assert [str(v.version) for v in client.search_model_versions("name='alpha'")] == ["1"]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/alpha/1")
    out = model.predict(np.full((2, 16, 16, 3), 220, np.uint8))
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    # in Postgres, not in a sqlite file under RFP_HOME
    assert sql(pg["mlflow"], "SELECT count(*) FROM runs WHERE experiment_id = %s", int(exp.experiment_id)) == [(2,)]
    assert sql(pg["mlflow"], "SELECT name FROM registered_models") == [("alpha",)]
    assert not (built["home"] / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.scale
def test_dagster_dev_daemon_records_sensor_ticks_in_postgres(pg, tmp_path):
    """The deployment as `make dev` runs it with RFP_POSTGRES_URL set: webserver, daemon and code
    server share the Postgres instance; the sensors' ticks land in its schedule storage."""
    home = pg_instance_home(tmp_path / "dagster_home")
    (tmp_path / "experiments").mkdir()  # no experiments: the sensors tick and skip
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RFP_POSTGRES_URL": pg["dagster"],
        "RFP_EXPERIMENTS_DIR": str(tmp_path / "experiments"),
        "RFP_HOME": str(tmp_path / "rfp_home"),
    }
    log = open(tmp_path / "dev.log", "w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ticked: set[str] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and "experiments_sensor" not in ticked:
            time.sleep(3)
            ticked = {
                deserialize_value(body).instigator_name
                for (body,) in sql(pg["dagster"], "SELECT tick_body FROM job_ticks WHERE type = 'SENSOR'")
            }
        assert proc.poll() is None, f"dagster dev exited early:\n{(tmp_path / 'dev.log').read_text()[-3000:]}"
        assert "experiments_sensor" in ticked, f"ticks of {ticked} only:\n{(tmp_path / 'dev.log').read_text()[-3000:]}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert not (home / "history").exists()  # nothing fell back to sqlite
