"""The demo's console progress: every stage named as it starts and ends, with its key figures."""

from __future__ import annotations

import io
import re

import dagster as dg
import pytest
from test_pipeline import RUN_CONFIG, STAGES, TINY_OVERRIDES, make_project, resources_for

from rfp_pipeline.run_progress import key_figures


def test_key_figures_pick_the_stage_numbers_and_say_why_a_stage_skipped():
    md = {
        "accuracy": dg.MetadataValue.float(0.93751),
        "steps": 40,
        "checkpoint": dg.MetadataValue.path("/x"),
        "accuracy_threshold": 0.8,
    }
    assert key_figures("saliency_checkpoint", md) == "accuracy 0.9375, accuracy_threshold 0.8, steps 40"
    assert (
        key_figures("structure_pairs", {"skipped": True, "reason": dg.MetadataValue.text("pairing is off")})
        == "skipped: pairing is off"
    )
    assert key_figures("media_manifest", {"frames_ok": 24, "frames_skipped": 0}) == "frames_ok 24, frames_skipped 0"
    assert key_figures("unknown_asset", {"a": 1}) == ""


@pytest.mark.slow  # a whole tiny graph (~1 min on 2 busy cores); the default suite replays test_pipeline's runs
def test_demo_runner_prints_each_stage_start_end_and_figures(tmp_path):
    from rfp_pipeline.demo import run_graph

    root, home = tmp_path / "project", tmp_path / "home"
    make_project(root, {"tiny": TINY_OVERRIDES})
    uri = f"sqlite:///{home}/mlflow.db"
    resources = resources_for(root, home, uri)
    out = io.StringIO()
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        instance.add_dynamic_partitions("experiments", ["tiny"])
        result = run_graph(instance, resources, "tiny", run_config=RUN_CONFIG, out=out)
    assert result.success
    text = out.getvalue()
    lines = text.splitlines()
    for stage in STAGES:
        start = [i for i, l in enumerate(lines) if re.search(rf"\] {stage}: started$", l)]
        done = [i for i, l in enumerate(lines) if re.search(rf"\] {stage}: done in [\d.]+ s", l)]
        assert len(start) == 1 and len(done) == 1 and start[0] < done[0], (stage, text)
    assert re.search(r"media_manifest: done in .* frames_ok 24, frames_skipped 0", text)
    assert re.search(r"saliency_checkpoint: done in .* accuracy [\d.]+", text)
    assert re.search(r"velocity_checkpoint: done in .* final_loss [\d.e-]+, steps 4", text)
    assert re.search(r"evaluation_samples: done in .* transfer_rate [\d.]+", text)
    assert re.search(r"check accuracy: (passed|FAILED)", text) and re.search(r"check mask_iou: passed", text)
    assert "structure_pairs: done in" in text and "skipped: " in text  # pairing is off in the tiny config


def test_training_bar_follows_the_running_mlflow_run(tmp_path):
    import time

    import mlflow

    from rfp_pipeline.run_progress import _TrainingBar

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("exp", artifact_location=(tmp_path / "art").as_uri())
    out = io.StringIO()
    bar = _TrainingBar(client, "exp", "velocity_checkpoint", time.time(), 100, out)
    bar.poll()
    assert bar.bar is None  # no run yet: no bar
    run = client.create_run(exp, run_name="velocity exp")
    client.create_run(exp, run_name="saliency exp")  # another stage's run is not followed
    for step, loss in ((0, 0.9), (9, 0.5), (19, 0.25)):
        client.log_metric(run.info.run_id, "velocity/loss", loss, step=step)
    client.log_metric(run.info.run_id, "velocity/images_per_s", 12.5, step=19)
    bar.poll()
    assert bar.run_id == run.info.run_id and bar.bar.n == 20 and bar.bar.total == 100
    client.log_metric(run.info.run_id, "velocity/loss", 0.125, step=39)
    bar.poll()
    assert bar.bar.n == 40
    bar.close()
    shown = out.getvalue()
    assert (
        "20/100" in shown
        and "40/100" in shown
        and "loss=0.25" in shown
        and "loss=0.125" in shown
        and "images_per_s=12.5" in shown
    )
