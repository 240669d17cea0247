"""Paired mode in the pipeline: an experiment with `"pairing": "filenames"` trains its velocity on
the same-stem pairs through the Dagster assets (a real instance, real ingest and training), with
plain MSE unless the experiment names a loss."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from stages import STAGES
from test_paired import _data
from test_pipeline import TINY, TINY_OVERRIDES, materialize_all, resources_for

from rfp_core.checkpoint import load_checkpoint
from rfp_core.config import ConfigError
from rfp_core.config_files import experiment_model_config, load_experiment
from rfp_core.media.manifest import read_manifest

UP_TO_VELOCITY = STAGES[: STAGES.index("velocity_checkpoint") + 1]


def _experiment(root: Path, overrides: dict, **extra) -> Path:
    path = root / "experiments" / "pairs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"domain0": ["data/a"], "domain1": ["data/b"], "config": str(TINY), "overrides": overrides, **extra}
    path.write_text(json.dumps(body))
    return path


def test_pairing_filenames_defaults_the_loss_to_mse_and_turns_structure_pairing_off(tmp_path):
    structure = {"structure": {"pairing": True, "encoder": "thumbnail"}}
    exp = load_experiment(_experiment(tmp_path, structure, pairing="filenames"), root=tmp_path)
    cfg = experiment_model_config(exp)
    assert cfg.velocity.loss == "mse" and not cfg.structure.pairing
    named = {"velocity": {"loss": "saliency"}}
    assert (
        experiment_model_config(
            load_experiment(_experiment(tmp_path, named, pairing="filenames"), root=tmp_path)
        ).velocity.loss
        == "saliency"
    )
    unpaired = experiment_model_config(load_experiment(_experiment(tmp_path, structure), root=tmp_path))
    assert unpaired.velocity.loss == "saliency" and unpaired.structure.pairing  # nothing changes without the key
    with pytest.raises(ConfigError, match="needs domain-0 files"):
        path = _experiment(tmp_path, {}, pairing="filenames")
        path.write_text(json.dumps({**json.loads(path.read_text()), "domain0": "random"}))
        experiment_model_config(load_experiment(path, root=tmp_path))
    with pytest.raises(ConfigError, match="pairing"):
        load_experiment(_experiment(tmp_path, {}, pairing="stems"), root=tmp_path)


def test_the_velocity_asset_trains_on_exactly_the_matching_files(tmp_path):
    root, home = tmp_path / "project", tmp_path / "home"
    _data(root / "data")  # p00..p05 in both domains (domain 1 partly nested), lonely.png in 0 only, extra.png in 1 only
    _experiment(root, TINY_OVERRIDES, pairing="filenames")
    resources = resources_for(root, home, f"sqlite:///{home}/mlflow.db")
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        instance.add_dynamic_partitions("experiments", ["pairs"])
        with pytest.warns(UserWarning, match="1 domain-0 and 1 domain-1"):
            result = materialize_all(instance, resources, "pairs", selection=UP_TO_VELOCITY)
    assert result.success
    meta = {m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()}
    vel = meta["velocity_checkpoint"]
    assert vel["pairing"].value == "filenames" and vel["pairs"].value == 6 and vel["velocity_loss"].value == "mse"
    assert (vel["unmatched_domain0"].value, vel["unmatched_domain1"].value) == (1, 1)
    assert vel["left_out"].value == "domain 0: lonely; domain 1: extra"
    assert meta["saliency_checkpoint"]["skipped"].value is True  # plain MSE needs no classifier

    # the pairs used: each stem's own two files, nothing drawn at random, the lonely files not at all
    out = home / "pipeline" / "pairs"
    record = json.loads((out / "velocity" / "result.json").read_text())
    pairs = pq.read_table(Path(record["checkpoint"]).parent / "pairs.parquet")
    manifest = read_manifest(out / "manifest.parquet")
    key_of = {
        (d, Path(p).stem): k
        for d, p, k in zip(*(manifest.column(c).to_pylist() for c in ("domain", "source_path", "frame_key")))
    }
    stems = [f"p{i:02d}" for i in range(6)]
    assert pairs.column("stem").to_pylist() == stems
    assert pairs.column("d0_key").to_pylist() == [key_of[(0, s)] for s in stems]
    assert pairs.column("d1_key").to_pylist() == [key_of[(1, s)] for s in stems]
    ckpt = load_checkpoint(record["checkpoint"])
    assert (
        ckpt["paired"]["pairs"] == 6 and ckpt["paired"]["loss"] == "mse" and ckpt["config"]["velocity"]["loss"] == "mse"
    )
    assert json.loads((out / "experiment.json").read_text())["pairing"] == "filenames"
