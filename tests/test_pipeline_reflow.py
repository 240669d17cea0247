"""The reflow assets (opt-in per experiment) materialised on a hand-made partition:
a real tiny velocity, the spec and stage records the upstream assets would have written."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from disc_data import make_discs

from rfp_core.checkpoint import load_checkpoint
from rfp_core.config_files import config_from_dict
from rfp_core.media.ingest import ingest
from rfp_core.train.velocity import train_velocity
from rfp_pipeline.assets import assets
from rfp_pipeline.assets.reflow import distilled_checkpoint, reflow_checkpoint, reflow_couplings, reflow_spec
from rfp_pipeline.definitions import default_resources
from rfp_pipeline.metadata import write_result
from rfp_pipeline.resources import RfpHome

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
REFLOW_ASSETS = [reflow_couplings, reflow_checkpoint, distilled_checkpoint]


def _partition(tmp_path: Path, reflow: dict | None) -> RfpHome:
    rfp = RfpHome(
        home=str(tmp_path / "rfp_home"), project_root=str(tmp_path), experiments_dir=str(tmp_path / "exp"), device="cpu"
    )
    d0, d1 = make_discs(tmp_path / "data", n=6, size=32)
    raw = {
        **json.loads(TINY.read_text()),
        "loss": "mse",
        "train_batch_size": 4,
        "train_minibatch_size": 4,
        "train_images": 8,
        "sample_batch_size": 2,
        "store_max_side": 64,
        "domain0": [str(d0)],
        "domain1": [str(d1)],
    }
    cfg = config_from_dict(raw)
    store = rfp.frame_store(64)
    manifest = ingest([d0], [d1], out=rfp.out_dir("x") / "manifest.parquet", store=store, progress=False).manifest_path
    vel = train_velocity(cfg, manifest, rfp.out_dir("x", "velocity", "k1"), store=store, progress=False)
    write_result(rfp.out_dir("x", "velocity"), {"checkpoint": str(vel.checkpoint), "key": "k1"})
    write_result(rfp.out_dir("x", "saliency"), {"skipped": True, "checkpoint": None, "key": None})
    spec = {"name": "x", "domain0": [str(d0)], "domain1": [str(d1)], "model_config": json.loads(cfg.to_json())}
    if reflow is not None:
        spec["reflow"] = reflow
    (rfp.out_dir("x") / "experiment.json").write_text(json.dumps(spec))
    return rfp


def _materialise(rfp: RfpHome, tmp_path: Path) -> dg.ExecuteInProcessResult:
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        instance.add_dynamic_partitions("experiments", ["x"])
        # the whole graph, so the velocity and saliency records load as the reflow assets' inputs (the
        # stage-record IO manager reads them from this `rfp`)
        return dg.materialize(
            assets,
            selection=REFLOW_ASSETS,
            partition_key="x",
            instance=instance,
            resources={**default_resources(), "rfp": rfp},
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
