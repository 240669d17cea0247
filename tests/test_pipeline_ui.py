"""What a user finds after a run, in MLflow and in Dagster's metadata (issue 14, items 1, 3 and 5),
on one tiny experiment materialised in a real instance with a real MLflow sqlite store."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import av
import dagster as dg
import mlflow
import pytest
from media_factory import make_image, make_video
from PIL import Image
from test_pipeline import TINY_OVERRIDES, make_project, materialize_all, register_partitions, resources_for

from rfp_core import tracking
from rfp_core.evaluate import explain
from rfp_core.media.images import paired_rows
from rfp_core.media.manifest import content_version
from rfp_core.structure.proof import spread
from rfp_pipeline.metadata import READABLE_WIDTH
from rfp_pipeline.resources import MlflowTracking

UI = "http://127.0.0.1:5123"  # not MLflow's default port: links must follow the configured address
NAME = "ui"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui")
    root, home = base / "project", base / "rfp_home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RFP_HOME", str(home))
        uri = f"sqlite:///{home}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # the tiny training may last under 1 s
        make_project(root, {NAME: TINY_OVERRIDES})
        make_video(root / "clips" / "walk.mp4", n_frames=10, size=24, fps=10)
        make_image(root / "clips" / "still.png", 20, (220, 90, 40))
        spec = json.loads((root / "experiments" / f"{NAME}.json").read_text())
        (root / "experiments" / f"{NAME}.json").write_text(json.dumps({**spec, "translate": ["clips/"]}))
        resources = resources_for(root, home, uri)
        resources["mlflow_tracking"] = MlflowTracking(
            tracking_uri=uri, artifact_root=str(home / "mlartifacts"), ui_url=UI
        )
        (base / "dagster_home").mkdir()
        with dg.instance_for_test(temp_dir=str(base / "dagster_home")) as instance:
            register_partitions(instance, resources)
            result = materialize_all(instance, resources, NAME)
            yield {"root": root, "home": home, "uri": uri, "instance": instance, "result": result}


def _md(result, asset: str) -> dict:
    mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    return {k: getattr(v, "value", v) for k, v in mats[asset].materialization.metadata.items()}


def _image(markdown: str) -> Image.Image:
    data = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown).group(1)
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_mlflow3_conventions_logged_model_registry_tags_dataset_and_runs_view(built):
    assert built["result"].success
    client = mlflow.MlflowClient(built["uri"])
    exp = client.get_experiment_by_name(NAME)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3 opens the runs table
    manifest = built["home"] / "pipeline" / NAME / "manifest.parquet"
    version = content_version(manifest)
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}
    for stage in ("saliency", "velocity"):
        inputs = runs[stage].inputs.dataset_inputs
        assert len(inputs) == 1
        ds = inputs[0].dataset
        assert ds.digest == version[:36] and ds.name == f"{NAME}-manifest" and ds.source_type == "local"
        tags = {t.key: t.value for t in inputs[0].tags}
        assert tags["content_version"] == version and tags["mlflow.data.context"] == "training"
        assert json.loads(ds.profile)["num_rows"] == 24  # 12 frames per domain
    # one logged model for the one final checkpoint, tagged, and scored by the evaluation
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert len(models) == 1
    model = models[0]
    assert model.source_run_id == runs["velocity"].info.run_id
    assert model.tags["partition"] == NAME and model.tags["input_data_version"] == version
    assert "eval/transfer_rate" in {m.key for m in model.metrics}
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["partition"] == NAME and mv.tags["input_data_version"] == version and mv.tags["spec_version"]
    assert mv.source == f"models:/{model.model_id}"  # the version is that logged model


def test_system_metrics_are_sampled_during_training(built):
    if not tracking.system_metrics_available():
        pytest.skip("psutil is not installed (pip install '.[system-metrics]'): no system metrics to check")
    client = mlflow.MlflowClient(built["uri"])
    exp = client.get_experiment_by_name(NAME)
    vel = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags["stage"] == "velocity")
    system = {k for k in vel.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system


def test_mlflow_links_use_the_configured_ui_address(built):
    for asset in ("saliency_checkpoint", "velocity_checkpoint", "evaluation_samples"):
        url = _md(built["result"], asset)["mlflow_run"]
        assert url.startswith(f"{UI}/#/experiments/") and url.endswith("?workflowType=machine_learning")


def test_grids_are_readable_pictures_of_every_evaluated_image(built):
    md = _md(built["result"], "evaluation_samples")
    metrics = json.loads((built["home"] / "pipeline" / NAME / "evaluation" / "metrics.json").read_text())
    n = metrics["n_eval"]
    tile = 16 + 2  # the 16 px frames and make_grid's 2 px padding
    for key in ("grid", "cycle_grid"):
        img = _image(md[key])
        assert img.width >= READABLE_WIDTH // 2, f"{key} is {img.size}: too small to read"
        factor = img.width // (10 * tile + 2)
        assert factor >= 2 and img.width == factor * (10 * tile + 2)
        assert img.height == factor * (2 * math.ceil(n / 10) * tile + 2)  # a row pair per 10 images: all n
        assert f"{n} held-out" in md["grid"] or key == "cycle_grid"


def test_metrics_are_rounded_and_explained(built):
    md = _md(built["result"], "evaluation_samples")
    full = json.loads((built["home"] / "pipeline" / NAME / "evaluation" / "metrics.json").read_text())
    for key in ("fid_judge", "fid_judge_floor", "cycle_error", "straightness"):
        assert md[key] == explain.rounded(full[key])
        assert len(f"{md[key]:e}".split("e")[0].rstrip("0").replace(".", "").lstrip("-")) <= explain.SIGNIFICANT
    table = md["metrics"]
    assert "| `fid_judge_floor` |" in table and "perfect translator" in table
    assert "| `transfer_rate` |" in table and "judge" in table


def test_check_results_name_their_partition(built):
    evaluations = built["result"].get_asset_check_evaluations()
    assert len(evaluations) == 6
    for e in evaluations:
        assert e.partition == NAME, e.asset_check_key
        assert e.metadata["partition"].value == NAME
        assert e.description.startswith(f"partition '{NAME}'")


def test_translated_media_translates_the_listed_clips_under_the_partition(built):
    md = _md(built["result"], "translated_media")
    assert md["outputs"] == 2 and md["videos"] == 1 and md["stills"] == 1 and md["video_frames"] == 10
    folder = built["home"] / "pipeline" / NAME / "translated"
    video = next(folder.rglob("walk.mp4"))
    with av.open(str(video)) as c:
        assert c.streams.video[0].width == 16 and sum(1 for _ in c.decode(video=0)) == 10
    still = Image.open(next(folder.rglob("still.png")))
    assert still.size == (16, 16)
    preview = _image(md["preview"])
    assert preview.width >= READABLE_WIDTH // 2


def test_an_experiment_without_media_to_translate_skips_and_says_how(built):
    from rfp_pipeline.assets.translated import NOTHING, _media

    assert "clips/" in NOTHING
    with pytest.raises(FileNotFoundError, match=r"'translate' lists .*no-such-clips.*fix the experiment file"):
        _media(built["root"] / "no-such-clips")
    videos, stills = _media(built["root"] / "clips")
    assert [v.name for v in videos] == ["walk.mp4"] and [s.name for s in stills] == ["still.png"]


def test_proof_sheet_rows_come_from_different_files():
    keys = [f"video:{i}" for i in range(8)] + ["a", "b", "c"]
    sources = {**{f"video:{i}": "v" for i in range(8)}, "a": "a", "b": "b", "c": "c"}
    assert spread(keys, sources, 4) == ["video:0", "a", "b", "c"]
    assert spread(keys, sources, 6) == ["video:0", "a", "b", "c", "video:1", "video:2"]
    assert spread(keys, None, 3) == keys[:3]


def test_paired_rows_hold_every_image_and_pad_the_last_row():
    import torch

    top, bottom = -torch.ones(13, 3, 4, 4), torch.zeros(13, 3, 4, 4)
    rows = paired_rows(top, bottom, 5)
    assert len(rows) == 6 and all(r.shape == (5, 3, 4, 4) for r in rows)
    assert torch.equal(rows[4][:3], top[10:]) and torch.equal(rows[5][:3], bottom[10:])
    assert torch.equal(rows[4][3:], torch.ones(2, 3, 4, 4))  # white filler


def test_an_existing_experiment_gets_the_runs_view_tag(isolated_rfp_home):
    uri = f"sqlite:///{isolated_rfp_home}/mlflow.db"
    isolated_rfp_home.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("made-by-hand", artifact_location=(isolated_rfp_home / "a").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert tracking.experiment_id("made-by-hand", uri) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_rounding_keeps_four_significant_digits():
    assert explain.rounded(0.123456) == 0.1235 and explain.rounded(1234.567) == 1235.0
    assert explain.rounded(7) == 7 and explain.rounded(0.0) == 0.0
    assert explain.note("kid_dinov2_floor").startswith("kernel distance") and explain.note("no_such") == ""
