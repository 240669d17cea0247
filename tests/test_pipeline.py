"""The Dagster pipeline end to end on tiny generated experiments: a real sqlite Dagster instance,
a real MLflow sqlite store, real ingest and training (16 px, a few steps)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pytest
from media_factory import make_image
from stages import STAGES

from rfp_pipeline.assets import assets
from rfp_pipeline.definitions import default_resources
from rfp_pipeline.resources import CheckThresholds, MlflowTracking, RfpHome
from rfp_pipeline.sensors import experiments_sensor

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"
# 16 px, one or two optimizer steps per phase: enough to exercise every stage, fast on 2 cores
TINY_OVERRIDES = {
    "max_size": 16,
    "store_max_side": 16,
    "saliency": {
        "accuracy_threshold": 0.6,
        "warmup_threshold": 0.55,
        "eval_every": 2,
        "max_steps": 60,
        "batch_size": 8,
        "holdout_fraction": 0.35,
        "augmentations": [],
    },
    "velocity": {
        "train_images": 32,
        "train_batch_size": 8,
        "train_minibatch_size": 8,
        "sample_batch_size": 4,
        "sample_every_images": 16,
        "num_inference_steps": 2,
    },
}
RUN_CONFIG = {"ops": {"evaluation_samples": {"config": {"judge_steps": 10, "max_images": 16}}}}


def warm(i: int) -> tuple[int, int, int]:
    return (200 + (i * 7) % 50, 60 + (i * 13) % 60, 30 + (i * 5) % 30)


def cool(i: int) -> tuple[int, int, int]:
    return (30 + (i * 5) % 30, 60 + (i * 11) % 60, 200 + (i * 7) % 50)


def make_project(root: Path, experiments: dict[str, dict], n: int = 12) -> Path:
    """A project folder: data/<exp>/domain{0,1} with n solid images each, experiments/<exp>.json."""
    for name, overrides in experiments.items():
        for i in range(n):
            make_image(root / "data" / name / "domain0" / f"a{i:02d}.png", 16, warm(i))
            make_image(root / "data" / name / "domain1" / f"b{i:02d}.png", 16, cool(i))
        write_experiment(root, name, overrides)
    return root


def write_experiment(root: Path, name: str, overrides: dict, generative: bool = False) -> Path:
    path = root / "experiments" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "domain0": "random" if generative else [f"data/{name}/domain0"],
                "domain1": [f"data/{name}/domain1"],
                "config": str(TINY),
                "overrides": overrides,
            }
        )
    )
    return path


def resources_for(root: Path, home: Path, tracking_uri: str) -> dict:
    res = default_resources()
    res["rfp"] = RfpHome(
        home=str(home), project_root=str(root), experiments_dir=str(root / "experiments"), device="cpu"
    )
    res["mlflow_tracking"] = MlflowTracking(tracking_uri=tracking_uri, artifact_root=str(home / "mlartifacts"))
    res["thresholds"] = CheckThresholds(min_transfer_rate=0.0, min_mask_iou=0.0)
    return res


def tick(sensor, instance: dg.DagsterInstance, resources: dict, cursor: str | None = None) -> dg.SensorResult:
    """One evaluation of `sensor`, as the daemon runs it (the context tears its resources down)."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"rfp": resources["rfp"]}) as ctx:
        return sensor(ctx)


def register_partitions(instance: dg.DagsterInstance, resources: dict) -> dg.SensorResult:
    """Run the experiments sensor once and apply its partition requests, as the daemon would."""
    result = tick(experiments_sensor, instance, resources)
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def materialize_all(instance, resources, partition: str, selection=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        partition_key=partition,
        run_config=RUN_CONFIG if selection is None or "evaluation_samples" in selection else None,
        selection=selection,
    )


def data_version(instance, key: str, partition: str) -> str:
    record = instance.get_latest_data_version_record(dg.AssetKey(key), partition_key=partition)
    return record.asset_materialization.tags["dagster/data_version"]


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three experiments (two configs side by side, one generative), the whole graph materialised for each."""
    base = tmp_path_factory.mktemp("pipeline")
    root, home = base / "project", base / "rfp_home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RFP_HOME", str(home))
        uri = f"sqlite:///{home}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        fast = {**TINY_OVERRIDES, "velocity": {**TINY_OVERRIDES["velocity"], "learning_rate": 0.002}}
        make_project(root, {"alpha": TINY_OVERRIDES, "beta": fast, "gen": TINY_OVERRIDES})
        write_experiment(root, "gen", TINY_OVERRIDES, generative=True)
        resources = resources_for(root, home, uri)
        (base / "dagster_home").mkdir()
        with dg.instance_for_test(temp_dir=str(base / "dagster_home")) as instance:
            sensor_result = register_partitions(instance, resources)
            results = {name: materialize_all(instance, resources, name) for name in ("alpha", "beta", "gen")}
            yield {
                "root": root,
                "home": home,
                "uri": uri,
                "instance": instance,
                "resources": resources,
                "results": results,
                "sensor": sensor_result,
            }


def test_experiments_sensor_adds_partitions_and_requests_their_spec(built):
    result = built["sensor"]
    assert [sorted(r.partition_keys) for r in result.dynamic_partitions_requests] == [["alpha", "beta", "gen"]]
    assert sorted(r.partition_key for r in result.run_requests) == ["alpha", "beta", "gen"]
    assert all(r.asset_selection == [dg.AssetKey("experiment_config")] for r in result.run_requests)
    # nothing changed: the next tick (same cursor) requests nothing
    again = tick(experiments_sensor, built["instance"], built["resources"], result.cursor)
    assert again.run_requests == [] and again.dynamic_partitions_requests == []
    # the file goes: the partition goes
    (built["root"] / "experiments" / "beta.json").rename(built["root"] / "beta.json.off")
    try:
        gone = tick(experiments_sensor, built["instance"], built["resources"], result.cursor)
        assert [(type(r).__name__, list(r.partition_keys)) for r in gone.dynamic_partitions_requests] == [
            ("DeleteDynamicPartitionsRequest", ["beta"])
        ]
    finally:
        (built["root"] / "beta.json.off").rename(built["root"] / "experiments" / "beta.json")


def test_whole_graph_materialises_with_metadata_and_checks(built):
    for name in ("alpha", "beta"):
        result = built["results"][name]
        assert result.success
        mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
        assert set(mats) == set(STAGES)
        manifest_md = mats["media_manifest"].materialization.metadata
        assert manifest_md["domain0_ok"].value == 12 and manifest_md["domain1_ok"].value == 12
        assert manifest_md["frames_skipped"].value == 0
        sal_md = mats["saliency_checkpoint"].materialization.metadata
        assert sal_md["accuracy"].value >= 0.6
        assert sal_md["mlflow_run"].value.startswith("http")
        vel_md = mats["velocity_checkpoint"].materialization.metadata
        assert np.isfinite(vel_md["final_loss"].value)
        grid = mats["evaluation_samples"].materialization.metadata["grid"].value
        assert grid.startswith("![") and "data:image/png;base64," in grid
        assert 0.0 <= mats["evaluation_samples"].materialization.metadata["transfer_rate"].value <= 1.0
        checks = {
            (e.asset_check_key.asset_key.to_user_string(), e.asset_check_key.name): e.passed
            for e in result.get_asset_check_evaluations()
        }
        assert checks == {
            ("media_manifest", "usable_frames"): True,
            ("media_manifest", "skip_rate"): True,
            ("saliency_checkpoint", "accuracy"): True,
            ("velocity_checkpoint", "loss_finite"): True,
            ("evaluation_samples", "transfer_rate"): True,
            ("evaluation_samples", "mask_iou"): True,
        }
        # per-partition outputs under $RFP_HOME/pipeline/<experiment>/
        out = built["home"] / "pipeline" / name
        assert (out / "manifest.parquet").exists() and (out / "evaluation" / "metrics.json").exists()
        # media_manifest's data version is the manifest's content version
        from rfp_core.media.manifest import content_version

        assert data_version(built["instance"], "media_manifest", name) == content_version(out / "manifest.parquet")


def test_mlflow_holds_one_run_per_training_asset_with_params_metrics_artifacts(built):
    client = mlflow.MlflowClient(built["uri"])
    for name in ("alpha", "beta"):
        exp = client.get_experiment_by_name(name)
        run_id = built["results"][name].run_id
        runs = client.search_runs([exp.experiment_id], f"tags.dagster_run_id = '{run_id}'")
        by_stage = {r.data.tags["stage"]: r for r in runs}
        assert sorted(by_stage) == ["saliency", "velocity"] and len(runs) == 2
        for run in by_stage.values():
            assert run.data.tags["dagster_run_id"] == run_id
            assert run.data.tags["partition"] == name
            assert run.data.params["max_size"] == "16"
            assert run.data.params["velocity.net.model_channels"] == "16"
            assert run.info.status == "FINISHED"
        sal, vel = by_stage["saliency"], by_stage["velocity"]
        assert len(client.get_metric_history(sal.info.run_id, "saliency/accuracy")) >= 1
        assert len(client.get_metric_history(vel.info.run_id, "velocity/loss")) >= 2  # per step
        assert "eval/transfer_rate" in vel.data.metrics
        artifacts = lambda rid, path: {a.path for a in client.list_artifacts(rid, path)}  # noqa: E731
        assert "saliency/saliency_state.json" in artifacts(sal.info.run_id, "saliency")
        assert any(p.endswith(".png") for p in artifacts(vel.info.run_id, "samples"))
        assert any(p.endswith(".png") for p in artifacts(sal.info.run_id, "samples"))
        assert "config/model_config.json" in artifacts(vel.info.run_id, "config")
        assert "evaluation/metrics.json" in artifacts(vel.info.run_id, "evaluation")


def test_registered_pyfunc_translates_like_the_checkpoint(built):
    import torch

    from rfp_core.inference.translate import Translator

    mlflow.set_tracking_uri(built["uri"])
    client = mlflow.MlflowClient(built["uri"])
    versions = client.search_model_versions("name='alpha'")
    assert [str(v.version) for v in versions] == ["1"]
    # the evaluation's checks passed (thresholds 0 here): the champion alias names that version
    assert str(client.get_model_version_by_alias("alpha", "champion").version) == "1"
    model = mlflow.pyfunc.load_model("models:/alpha/1")
    images = np.stack([np.full((16, 16, 3), warm(i), np.uint8) for i in range(3)])
    out = model.predict(images)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
    vel = json.loads((built["home"] / "pipeline" / "alpha" / "velocity" / "result.json").read_text())
    tr = Translator.from_run(vel["checkpoint"], device="cpu")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    ref = ((tr.translate(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    back = model.predict(images, params={"reverse": True, "steps": 1})
    assert back.shape == out.shape and not np.array_equal(back, out)


def test_generative_experiment_skips_saliency_and_says_why(built):
    result = built["results"]["gen"]
    assert result.success
    mats = {m.asset_key.to_user_string(): m.materialization for m in result.get_asset_materialization_events()}
    assert set(mats) == set(STAGES)
    sal = mats["saliency_checkpoint"].metadata
    assert sal["skipped"].value is True and "generative" in sal["reason"].value
    assert mats["media_manifest"].metadata["domain0_ok"].value == 0
    assert "data:image/png;base64," in mats["evaluation_samples"].metadata["grid"].value
    client = mlflow.MlflowClient(built["uri"])
    runs = client.search_runs([client.get_experiment_by_name("gen").experiment_id])
    assert [r.data.tags["stage"] for r in runs] == ["velocity"]
    assert runs[0].data.params["domain0"] == "random"


def test_two_configs_side_by_side_in_search_runs(built):
    mlflow.set_tracking_uri(built["uri"])
    df = mlflow.search_runs(experiment_names=["alpha", "beta"], filter_string="tags.stage = 'velocity'")
    assert len(df) == 2
    rows = {r["tags.partition"]: r for _, r in df.iterrows()}
    assert rows["alpha"]["params.velocity.learning_rate"] == "0.001"
    assert rows["beta"]["params.velocity.learning_rate"] == "0.002"
    assert all(np.isfinite(r["metrics.velocity/final_loss"]) for r in rows.values())
    assert all(0 <= r["metrics.eval/transfer_rate"] <= 1 for r in rows.values())


def test_failing_blocking_check_stops_the_stages_after_it(built):
    resources = {**built["resources"], "thresholds": CheckThresholds(min_saliency_accuracy=1.01)}
    result = dg.materialize(
        assets,
        instance=built["instance"],
        resources=resources,
        partition_key="alpha",
        selection=["saliency_checkpoint", "velocity_checkpoint"],
        raise_on_error=False,
    )
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"accuracy": False}
    done = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert done == {"saliency_checkpoint"}  # the velocity never trained on a classifier below the limit
    # what `make demo` would print for such a run
    from rfp_pipeline.run_progress import replay

    text = "\n".join(replay(built["instance"], result.run_id, out=io.StringIO()))
    assert (
        "check accuracy: FAILED (accuracy" in text
        and "velocity_checkpoint: Dependencies for step velocity_checkpoint failed" in text
    ), text


def test_a_failing_evaluation_check_is_blocking_and_reported_failed_for_its_partition(built):
    from rfp_pipeline.checks import EVALUATION_CHECKS

    assert {s.name: s.blocking for s in EVALUATION_CHECKS} == {"transfer_rate": True, "mask_iou": True}
    instance = built["instance"]
    resources = {**built["resources"], "thresholds": CheckThresholds(min_transfer_rate=1.01, min_mask_iou=0.0)}
    result = dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        partition_key="alpha",
        selection=["evaluation_samples"],
        run_config=RUN_CONFIG,
        raise_on_error=False,
    )
    assert not result.success  # a failed blocking check fails its step: later stages of the run would not run
    evals = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evals["transfer_rate"].passed is False and evals["transfer_rate"].metadata["min_transfer_rate"].value == 1.01
    assert evals["mask_iou"].passed is True  # alpha has no true masks: nothing to fail
    # the failed check judged alpha's new materialisation
    latest = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("evaluation_samples"), asset_partitions=["alpha"]), limit=1
    ).records[0]
    assert evals["transfer_rate"].target_materialization_data.storage_id == latest.storage_id
    assert latest.event_log_entry.dagster_event.partition == "alpha"
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "blocking asset check failed" in failure and "transfer_rate" in failure


def test_a_non_finite_velocity_loss_fails_loss_finite_visibly_and_registers_nothing(built):
    root, instance = built["root"], built["instance"]
    velocity = {
        **TINY_OVERRIDES["velocity"],
        "loss": "mse",
        "learning_rate": 1e30,
        "gradient_clip": 0,
        "lr_schedule": "constant",
        "warmup_fraction": 0.0,
        "checkpoint_every_steps": 1,
    }
    (root / "experiments" / "nan.json").write_text(
        json.dumps(
            {
                "domain0": ["data/alpha/domain0"],
                "domain1": ["data/alpha/domain1"],
                "config": str(TINY),
                "overrides": {**TINY_OVERRIDES, "velocity": velocity},
            }
        )
    )
    instance.add_dynamic_partitions("experiments", ["nan"])
    try:
        result = dg.materialize(
            assets,
            instance=instance,
            resources=built["resources"],
            partition_key="nan",
            run_config=RUN_CONFIG,
            raise_on_error=False,
        )
    finally:
        (root / "experiments" / "nan.json").unlink()
    assert not result.success
    done = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert "velocity_checkpoint" not in done and "evaluation_samples" not in done and "frame_store" in done
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["loss_finite"]
    md = {k: v.value for k, v in check.metadata.items()}
    assert check.passed is False and md["partition"] == "nan" and md["step"] >= 2
    assert (
        md["last_good_checkpoint"].endswith(f"velocity_{md['step'] - 1:08d}.pt")
        and Path(md["last_good_checkpoint"]).is_file()
    )
    failure = result.get_step_failure_events()[0].step_failure_data
    assert "velocity loss became" in failure.user_failure_data.description
    client = mlflow.MlflowClient(built["uri"])
    assert client.search_model_versions("name='nan'") == []
    runs = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert [(r.data.tags["stage"], r.info.status) for r in runs] == [("velocity", "FAILED")]


def test_progress_lines_name_each_stage_with_its_time_and_figures(built):
    """`make demo`'s console lines, replayed from a finished run's event log."""
    from rfp_pipeline.run_progress import replay

    lines = replay(built["instance"], built["results"]["alpha"].run_id, out=io.StringIO())
    for stage in STAGES:
        start = [i for i, l in enumerate(lines) if l.endswith(f"] {stage}: started")]
        done = [i for i, l in enumerate(lines) if re.search(rf"\] {stage}: done in [\d.]+ s", l)]
        assert len(start) == 1 and len(done) == 1 and start[0] < done[0], (stage, lines)
    text = "\n".join(lines)
    assert re.search(r"media_manifest: done in .* frames_ok 24, frames_skipped 0", text)
    assert re.search(r"saliency_checkpoint: done in .* accuracy [\d.]+", text)
    assert re.search(r"velocity_checkpoint: done in .* final_loss [\d.e-]+, steps 4", text)
    assert re.search(r"evaluation_samples: done in .* transfer_rate [\d.]+", text)
    assert re.search(r"check mask_iou: passed", text) and "champion models:/alpha@champion = version 1" in text
