"""Saliency training out of process through Dagster Pipes: a real subprocess on tiny data, its
per-step metrics streamed into the Dagster event log and the asset's MLflow run."""

import os
from pathlib import Path

import dagster as dg
import mlflow
import pytest
from test_pipeline import TINY_OVERRIDES, make_project, register_partitions, resources_for

from rfp_core import experiments as exps
from rfp_core.checkpoint import load_checkpoint
from rfp_pipeline.assets import assets
from rfp_pipeline.assets.ingest import manifest_path
from rfp_pipeline.assets.training import current_codec
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.pipes import TrainingLauncher
from rfp_pipeline.resources import MlflowTracking, RfpHome

UPSTREAM = ["experiment_config", "media_manifest", "frame_store", "codec_checkpoint"]


@dg.asset(partitions_def=experiments_partitions)
def saliency_via_launcher(
    context: dg.AssetExecutionContext,
    experiment_config: dict,
    frame_store: dict,
    codec_checkpoint: dict,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
    training_launcher: TrainingLauncher,
) -> dg.MaterializeResult:
    """The wiring the saliency asset gets: the launcher replaces the train_saliency call inside the MLflow run."""
    name = context.partition_key
    cfg = exps.model_config(experiment_config)
    codec = current_codec(codec_checkpoint, name, cfg)
    tags = {"stage": "saliency", "dagster_run_id": context.run.run_id}
    with mlflow_tracking.start_run(name, f"saliency {name}", tags) as run:
        launched = training_launcher.train_saliency(
            context,
            cfg,
            manifest_path(frame_store),
            rfp.out_dir(name, "saliency_launcher"),
            device=rfp.resolve_device(),
            store=rfp.frame_store(cfg.store_max_side),
            codec_checkpoint=Path(codec["checkpoint"]) if codec else None,
            log=lambda m, step: mlflow.log_metrics(m, step=step),
            mlflow_uri=mlflow_tracking.uri(),
            mlflow_run_id=run.info.run_id,
        )
    res = launched.result
    return dg.MaterializeResult(
        metadata={
            "accuracy": res.accuracy,
            "steps": res.steps,
            "mlflow_run_id": run.info.run_id,
            "checkpoint": dg.MetadataValue.path(str(res.checkpoint)),
            **launched.metadata,
        }
    )


@pytest.fixture
def project(tmp_path, isolated_rfp_home):
    root, home = tmp_path / "project", isolated_rfp_home
    uri = os.environ["MLFLOW_TRACKING_URI"]
    make_project(root, {"alpha": TINY_OVERRIDES})
    resources = resources_for(root, home, uri)
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        register_partitions(instance, resources)
        assert dg.materialize(
            assets, instance=instance, resources=resources, partition_key="alpha", selection=UPSTREAM
        ).success
        yield instance, resources, uri


def launch(instance, resources, mode: str, **kw) -> dg.ExecuteInProcessResult:
    # the real assets come along so the codec record loads as the input (only the probe runs)
    return dg.materialize(
        [*assets, saliency_via_launcher],
        selection=[saliency_via_launcher],
        instance=instance,
        partition_key="alpha",
        resources={**resources, "training_launcher": TrainingLauncher(mode=mode)},
        **kw,
    )


@pytest.mark.slow
def test_saliency_trains_in_a_pipes_subprocess_and_streams_its_steps(project):
    instance, resources, uri = project
    result = launch(instance, resources, "pipes")
    assert result.success
    md = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}
    assert md["launcher"] == "pipes" and md["worker_pid"] != os.getpid()
    every = TINY_OVERRIDES["saliency"]["eval_every"]
    evaluations = -(-md["steps"] // every)  # an evaluation every `every` steps and at the last one
    assert md["pipes_steps_streamed"] == evaluations + 1  # and the report-split accuracy at the end
    # the worker's log lines are in the run's event log, in step order, the last evaluation at the final
    # accuracy, then the accuracy on the frames that did not decide the stop
    lines = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message.startswith("saliency step ")]
    train_lines = [line for line in lines if "saliency/loss" in line]
    expected_steps = sorted({min(s, md["steps"]) for s in range(every, md["steps"] + every, every)})
    assert [int(line.split()[2].rstrip(":")) for line in train_lines] == expected_steps
    assert f'"saliency/accuracy": {round(md["accuracy"], 6)}' in train_lines[-1]
    assert len(lines) == len(train_lines) + 1 and '"saliency/report_accuracy"' in lines[-1]
    # ... and in the asset's MLflow run, which the worker logged into by id without ending it
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(md["mlflow_run_id"], "saliency/accuracy")
    assert len(history) == evaluations and history[-1].value == pytest.approx(md["accuracy"])
    assert client.get_run(md["mlflow_run_id"]).info.status == "FINISHED"
    ckpt = load_checkpoint(Path(md["checkpoint"]), map_location="cpu")
    assert "saliency" in ckpt


@pytest.mark.slow
def test_default_launcher_trains_in_process(project):
    instance, resources, _ = project
    result = launch(instance, resources, "")
    md = result.get_asset_materialization_events()[0].materialization.metadata
    assert result.success and "launcher" not in md
    assert not [e for e in instance.all_logs(result.run_id) if e.user_message.startswith("saliency step ")]


@pytest.mark.slow
def test_worker_failure_fails_the_asset_with_its_error(project, monkeypatch):
    instance, resources, _ = project
    monkeypatch.setenv("RFP_TRAINING_LAUNCHER", "pipes")
    manifest = resources["rfp"].out_dir("alpha") / "manifest.parquet"
    manifest.write_bytes(b"not parquet")
    result = launch(instance, resources, "", raise_on_error=False)
    assert not result.success
    closed = [
        e.dagster_event.engine_event_data.error
        for e in instance.all_logs(result.run_id)
        if e.is_dagster_event and e.dagster_event.message == "[pipes] external process pipes closed with exception"
    ]
    # the worker's own message (naming the file) reaches the event log, not just "exit code 1"
    assert len(closed) == 1 and f"{manifest} is not a readable parquet manifest" in closed[0].to_string()
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "External execution process failed with code 1" in failure.to_string()


def test_unknown_launcher_mode_says_how_to_fix_it():
    with pytest.raises(ValueError, match="RFP_TRAINING_LAUNCHER"):
        TrainingLauncher(mode="slurm").resolved_mode()


# --- the velocity asset through Pipes: streamed steps, final metadata, a killed worker and the retry ---
VELOCITY_UPSTREAM = [*UPSTREAM, "saliency_checkpoint", "structure_pairs"]
VELOCITY_STEPS = 40  # long enough that the kill lands mid-run: a checkpoint every step


@pytest.fixture
def velocity_project(tmp_path, isolated_rfp_home):
    root, home = tmp_path / "project", isolated_rfp_home
    velocity = {
        **TINY_OVERRIDES["velocity"],
        "train_images": 8 * VELOCITY_STEPS,
        "checkpoint_every_steps": 1,
        "sample_every_images": 10_000,
    }
    make_project(root, {"alpha": {**TINY_OVERRIDES, "velocity": velocity}})
    resources = resources_for(root, home, os.environ["MLFLOW_TRACKING_URI"])
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        register_partitions(instance, resources)
        assert dg.materialize(
            assets, instance=instance, resources=resources, partition_key="alpha", selection=VELOCITY_UPSTREAM
        ).success
        yield instance, {**resources, "training_launcher": TrainingLauncher(mode="pipes")}, home


def _kill_worker_after_checkpoint(stage: Path, step: int, killed: list) -> None:
    """Watch for velocity_<step>.pt, then SIGKILL the Pipes worker (a child of this process)."""
    import glob
    import signal
    import time

    import psutil

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not glob.glob(str(stage / "*" / f"velocity_{step:08d}.pt")):
        time.sleep(0.02)
    for child in psutil.Process().children(recursive=True):
        if "rfp_pipeline.pipes_worker" in " ".join(child.cmdline()):
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)


def _streamed_steps(instance, run_id: str) -> list[int]:
    return [
        int(e.user_message.split()[2].rstrip(":"))
        for e in instance.all_logs(run_id)
        if e.user_message.startswith("velocity step ")
    ]


@pytest.mark.slow
def test_velocity_asset_trains_through_pipes_a_kill_fails_the_run_and_a_retry_resumes(velocity_project):
    import threading

    instance, resources, home = velocity_project
    killed: list[int] = []
    watcher = threading.Thread(
        target=_kill_worker_after_checkpoint, args=(home / "pipeline" / "alpha" / "velocity", 3, killed)
    )
    watcher.start()
    first = dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        partition_key="alpha",
        selection=["velocity_checkpoint"],
        raise_on_error=False,
    )
    watcher.join()
    assert len(killed) == 1 and not first.success
    assert instance.get_run_by_id(first.run_id).status == dg.DagsterRunStatus.FAILURE
    failure = first.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "External execution process failed with code -9" in failure
    done_before = _streamed_steps(instance, first.run_id)
    assert done_before and done_before[-1] < VELOCITY_STEPS  # it was streaming when it died

    retry = dg.materialize(
        assets, instance=instance, resources=resources, partition_key="alpha", selection=["velocity_checkpoint"]
    )
    assert retry.success
    md = {k: v.value for k, v in retry.get_asset_materialization_events()[0].materialization.metadata.items()}
    assert md["launcher"] == "pipes" and md["worker_pid"] not in (os.getpid(), killed[0])
    assert md["steps"] == VELOCITY_STEPS and md["final_loss"] > 0
    # the retry resumed from a checkpoint the killed worker wrote (step >= 3), not from step 0
    steps = _streamed_steps(instance, retry.run_id)
    every = VELOCITY_STEPS // 20  # train_velocity logs every total // 20 steps
    assert steps[0] > 3 and steps == list(range(steps[0], VELOCITY_STEPS + 1, every))
    assert md["pipes_steps_streamed"] == len(steps)
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run_id = md["mlflow_run"].split("?")[0].rstrip("/").split("/")[-1]  # the link ends ?workflowType=...
    history = client.get_metric_history(run_id, "velocity/loss")
    assert [m.step for m in history] == steps


@pytest.mark.slow
def test_codec_asset_trains_through_pipes_and_streams_its_steps(tmp_path, isolated_rfp_home):
    root, home = tmp_path / "project", isolated_rfp_home
    vae = {
        "type": "VAE",
        "latent_channels": 4,
        "model_channels": 8,
        "ch_mult": [1, 2],
        "normalization": "GroupNormAuto",
        "num_res_blocks": 1,
    }
    codec = {
        "net": vae,
        "losses": [{"type": "L1Loss"}, {"type": "KLLoss"}],
        "train_images": 8 * 6,
        "train_batch_size": 8,
    }
    make_project(root, {"alpha": {**TINY_OVERRIDES, "codec": codec}})
    resources = resources_for(root, home, os.environ["MLFLOW_TRACKING_URI"])
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        register_partitions(instance, resources)
        result = dg.materialize(
            assets,
            instance=instance,
            partition_key="alpha",
            selection=UPSTREAM,
            resources={**resources, "training_launcher": TrainingLauncher(mode="pipes")},
        )
        assert result.success
        events = [
            e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("codec_checkpoint")
        ]
        md = {k: v.value for k, v in events[0].materialization.metadata.items()}
        assert md["launcher"] == "pipes" and md["worker_pid"] != os.getpid() and md["steps"] == 6
        lines = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message.startswith("codec step ")]
        assert (
            len(lines) == md["pipes_steps_streamed"] > 0
            and f'"codec/recon_l1": {round(md["recon_l1"], 6)}' in lines[-1]
        )
        assert "codec" in load_checkpoint(Path(md["checkpoint"]), map_location="cpu")
