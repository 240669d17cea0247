"""The reflow assets (opt-in per experiment) materialised on a hand-made partition:
a real tiny velocity, the spec and stage records the upstream assets would have written."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch
from disc_data import make_discs

from rfp_core.checkpoint import load_checkpoint
from rfp_core.config_files import config_from_dict
from rfp_core.media.demo_data import make_demo_data
from rfp_core.media.ingest import ingest
from rfp_core.train.velocity import train_velocity
from rfp_pipeline.assets import assets, evaluation_samples
from rfp_pipeline.assets.reflow import distilled_checkpoint, reflow_checkpoint, reflow_couplings, reflow_spec
from rfp_pipeline.definitions import default_resources
from rfp_pipeline.metadata import write_result
from rfp_pipeline.resources import CheckThresholds, MlflowTracking, RfpHome

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"
REFLOW_ASSETS = [reflow_couplings, reflow_checkpoint, distilled_checkpoint]


def _partition(tmp_path: Path, reflow: dict | None, demo: bool = False) -> RfpHome:
    """`demo`: the demo's kind of data (with true masks, video frames for a held-out set) and an MLflow
    run + registered version 1 for the velocity, as `velocity_checkpoint` leaves them."""
    rfp = RfpHome(
        home=str(tmp_path / "rfp_home"), project_root=str(tmp_path), experiments_dir=str(tmp_path / "exp"), device="cpu"
    )
    if demo:
        data = make_demo_data(tmp_path / "data", num=24, size=32, seed=1, video_frames=2)
        d0, d1 = data.domain0, data.domain1
    else:
        d0, d1 = make_discs(tmp_path / "data", n=6, size=32)
    raw = {
        **json.loads(TINY.read_text()),
        "loss": "mse",
        "train_batch_size": 4,
        "train_minibatch_size": 4,
        "train_images": 8,
        "sample_batch_size": 2,
        "store_max_side": 64,
        # a held-out set of a few frames a domain for the evaluation (its judge needs 2 at least)
        **({"saliency_holdout_fraction": 0.3} if demo else {}),
        "domain0": [str(d0)],
        "domain1": [str(d1)],
    }
    cfg = config_from_dict(raw)
    store = rfp.frame_store(64)
    manifest = ingest([d0], [d1], out=rfp.out_dir("x") / "manifest.parquet", store=store, progress=False).manifest_path
    vel = train_velocity(cfg, manifest, rfp.out_dir("x", "velocity", "k1"), store=store, progress=False)
    record = {"checkpoint": str(vel.checkpoint), "key": "k1"}
    if demo:
        tracking = MlflowTracking()
        with tracking.start_run("x", "velocity x", {}) as run:
            uri, version = tracking.log_translator(vel.checkpoint, registered_name="x")
        record.update(mlflow_run_id=run.info.run_id, model_uri=uri, model_version=version)
    write_result(rfp.out_dir("x", "velocity"), record)
    write_result(rfp.out_dir("x", "saliency"), {"skipped": True, "checkpoint": None, "key": None})
    write_result(rfp.out_dir("x", "frame_store"), {"manifest": str(manifest)})  # the manifest the frames are of
    spec = {"name": "x", "domain0": [str(d0)], "domain1": [str(d1)], "model_config": json.loads(cfg.to_json())}
    if demo:
        spec["masks"] = str(data.masks_dir(0))
    if reflow is not None:
        spec["reflow"] = reflow
    (rfp.out_dir("x") / "experiment.json").write_text(json.dumps(spec))
    return rfp


def _materialise(rfp: RfpHome, tmp_path: Path, selection=REFLOW_ASSETS) -> dg.ExecuteInProcessResult:
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        instance.add_dynamic_partitions("experiments", ["x"])
        # the whole graph, so the velocity and saliency records load as the reflow assets' inputs (the
        # stage-record IO manager reads them from this `rfp`)
        return dg.materialize(
            assets,
            selection=selection,
            partition_key="x",
            instance=instance,
            # a few training steps translate badly: the evaluation's blocking checks are not under test here
            resources={**default_resources(), "rfp": rfp, "thresholds": CheckThresholds(min_transfer_rate=0.0)},
        )


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("reflow_couplings")
        + result.asset_materializations_for_node("reflow_checkpoint")
        + result.asset_materializations_for_node("distilled_checkpoint")
    }


def test_reflow_assets_materialise_when_opted_in(tmp_path):
    rfp = _partition(tmp_path, {"rounds": 1, "pairs": 4, "distill": True, "steps_solver": 2, "train_steps": 2})
    result = _materialise(rfp, tmp_path)
    assert result.success
    meta = _metadata(result)
    assert meta["reflow_couplings"]["pairs"].value == 4
    out = next((rfp.home_path() / "pipeline" / "x" / "reflow").iterdir())
    assert load_checkpoint(out / "reflow_1" / "velocity.pt")["reflow"]["kind"] == "reflow"
    assert load_checkpoint(out / "distilled" / "velocity.pt")["reflow"]["source"] == "reflow_1/velocity.pt"
    assert "| distilled | 1 |" in meta["distilled_checkpoint"]["steps_table"].value
    assert meta["reflow_checkpoint"]["retrained"].value == 1


def test_the_demo_experiments_reflow_stages_materialise_and_score_one_step(tmp_path, capfd):
    """experiments/demo.json's own reflow block (only its sizes cut down): no k-RF, the 1-RF couplings
    solved with the demo's sampler, distilled, scored at N = 1 by the evaluation's judge, and a registered
    pyfunc version that serves steps 1 with the distilled map."""
    import mlflow
    import numpy as np

    from rfp_core.inference.translate import Translator
    from rfp_pipeline.demo import steps_rows
    from rfp_pipeline.run_progress import key_figures

    demo = json.loads((ROOT / "experiments" / "demo.json").read_text())["reflow"]
    assert demo["rounds"] == 0 and demo["distill"] and demo["evaluate"]
    rfp = _partition(tmp_path, {**demo, "pairs": 4, "train_steps": 2}, demo=True)
    result = _materialise(rfp, tmp_path, selection=[evaluation_samples, *REFLOW_ASSETS])
    assert result.success
    meta = _metadata(result)
    assert meta["reflow_checkpoint"]["rounds"].value == 0 and meta["reflow_couplings"]["pairs"].value == 4
    out = next((rfp.home_path() / "pipeline" / "x" / "reflow").iterdir())
    assert not list(out.glob("reflow_*/velocity.pt")), "rounds 0: no k-RF trained"
    distilled = out / "distilled" / "velocity.pt"
    ckpt = load_checkpoint(distilled)
    assert ckpt["reflow"]["source"].endswith("velocity.pt") and ckpt["reflow"]["kind"] == "distilled"
    assert (ckpt["config"]["velocity"]["sampler"], ckpt["config"]["velocity"]["num_inference_steps"]) == ("euler", 1)
    couplings = next((rfp.home_path() / "reflow").iterdir())
    assert json.loads((couplings / "spec.json").read_text())["solver"] == {"sampler": "heun", "steps": 4}

    rec = json.loads((rfp.out_dir("x", "distilled_checkpoint") / "result.json").read_text())
    one, flow = rec["evaluation"], json.loads(Path(rfp.out_dir("x", "evaluation") / "metrics.json").read_text())
    assert (one["steps"], one["sampler"], one["nfe"]) == (1, "euler", 1)
    # the same held-out frames and the same judge as the evaluation stage's
    assert one["n_eval"] == flow["n_eval"] and one["judge_accuracy"] == flow["judge_accuracy"]
    assert 0.0 <= one["transfer_rate"] <= 1.0 and 0.0 <= one["mask_iou"] <= 1.0 and one["ms_per_image"] > 0
    assert meta["distilled_checkpoint"]["one_step_transfer_rate"].value == one["transfer_rate"]
    # the line the demo prints when the stage ends
    assert key_figures("distilled_checkpoint", meta["distilled_checkpoint"]).startswith("one_step_transfer_rate ")
    rows = steps_rows(flow, one)
    assert len(rows) == 3 and rows[2].split()[:4] == ["distilled", "euler", "x", "1"]
    assert f"{one['mask_iou']:.3f}" in rows[2] and f"{flow['mask_iou']:.3f}" in rows[1]

    # the new registered version: steps 1 is the distilled map, other steps the flow; it says which
    assert rec["model_version"] == "2"
    model = mlflow.pyfunc.load_model(f"models:/x/{rec['model_version']}")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    capfd.readouterr()
    got = model.predict(images, params={"steps": 1})
    assert "model: distilled" in capfd.readouterr().err
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    want = Translator.from_run(distilled, device="cpu").translate(x, steps=1)
    assert np.abs(got.astype(int) - ((want.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()).max() <= 1
    model.predict(images, params={"steps": 2})
    assert "model: velocity" in capfd.readouterr().err


def test_reflow_assets_skip_without_the_opt_in(tmp_path):
    result = _materialise(_partition(tmp_path, None), tmp_path)
    assert result.success
    assert all(m["skipped"].value is True for m in _metadata(result).values())


def test_reflow_spec_and_graph():
    assert reflow_spec({"name": "x"}) is None
    assert reflow_spec({"reflow": {"rounds": 2}})["rounds"] == 2
    with pytest.raises(ValueError, match="unknown reflow key"):
        reflow_spec({"name": "x", "reflow": {"round": 2}})
    # the assets join the existing graph without dangling or duplicate keys
    defs = dg.Definitions(assets=assets, resources=default_resources())  # definitions.py's own list
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("reflow_couplings")).parent_keys}
    assert parents == {"velocity_checkpoint", "frame_store", "experiment_config"}
