"""Structure pairing and the codec in the Dagster graph: incremental embeddings, pairs feeding the
velocity (and making it stale when they change), a VAE codec through saliency and velocity.
Real Dagster instance, real MLflow sqlite store, real training on 16 px discs."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver
from disc_data import disc_image, make_discs
from PIL import Image
from test_pipeline import RUN_CONFIG, TINY_OVERRIDES, data_version, register_partitions, resources_for, write_experiment
from test_pipeline_incremental import training_requests as automation_requests

from rfp_pipeline.assets import assets

PAIRED = {**TINY_OVERRIDES, "structure": {"pairing": True, "encoder": "thumbnail", "candidates": 3}}
TINY_VAE = {
    "type": "VAE",
    "latent_channels": 4,
    "model_channels": 8,
    "ch_mult": [1, 2],
    "normalization": "GroupNormAuto",
    "num_res_blocks": 1,
}
# an SAE codec (spherical latents) under a DiT velocity: both of the current trainer's newer nets
TINY_SAE = {**TINY_VAE, "type": "SAE"}
TINY_DIT = {"type": "DiT", "patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 4}
SAE_DIT = {
    **TINY_OVERRIDES,
    "codec": {
        "net": TINY_SAE,
        "learning_rate": 3e-3,
        "train_images": 16 * 30,
        "train_batch_size": 16,
        "lr_schedule": "constant",
        "losses": [
            {"type": "L1Loss"},
            {"type": "SAEPixelConsistencyLoss", "lpips_weight": 0.0},
            {"type": "SAELatentConsistencyLoss", "weight": 0.1},
        ],
    },
    "velocity": {**TINY_OVERRIDES["velocity"], "net": TINY_DIT},
}
EMBED = ["experiment_config", "media_manifest", "frame_store", "structure_embeddings"]
TRAIN = ["codec_checkpoint", "saliency_checkpoint", "velocity_checkpoint"]
WATCHED = [dg.AssetKey(k) for k in ("structure_embeddings", "codec_checkpoint", "saliency_checkpoint")]


def make_experiments(root: Path, experiments: dict[str, dict], n: int = 10) -> Path:
    for seed, (name, overrides) in enumerate(experiments.items()):
        make_discs(root / "data" / name, n=n, size=16, seed=seed)
        write_experiment(root, name, overrides)
    return root


def materialize(instance, resources, partition, selection, **kw) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        partition_key=partition,
        selection=selection,
        run_config=RUN_CONFIG if "evaluation_samples" in selection else None,
        **kw,
    )


def metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def stale(instance, key: str, partition: str) -> StaleStatus:
    return get_stale_status_resolver(instance, assets).get_status(dg.AssetKey(key), partition)


@pytest.fixture
def project(tmp_path, isolated_rfp_home):
    """`project({name: overrides}, n)` -> (root, resources, instance): disc data, experiment files, partitions."""
    with contextlib.ExitStack() as stack:

        def start(experiments: dict[str, dict], n: int = 10):
            root = make_experiments(tmp_path / "project", experiments, n)
            resources = resources_for(root, isolated_rfp_home, os.environ["MLFLOW_TRACKING_URI"])
            (tmp_path / "dagster_home").mkdir()
            instance = stack.enter_context(dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")))
            register_partitions(instance, resources)
            return root, resources, instance

        yield start


def test_adding_one_image_computes_exactly_one_embedding(project):
    root, resources, instance = project({"paired": PAIRED})
    first = metadata(materialize(instance, resources, "paired", EMBED))["structure_embeddings"]
    assert (first["computed"], first["cached"], first["encoder_id"]) == (20, 0, "thumbnail16")
    v1 = data_version(instance, "structure_embeddings", "paired")

    now = datetime.datetime.now(datetime.timezone.utc)
    _, cursor = automation_requests(instance, None, now, WATCHED)  # the baseline evaluation

    disc_image(1, np.random.default_rng(99), 16).save(root / "data" / "paired" / "domain1" / "new.png")
    assert materialize(instance, resources, "paired", ["media_manifest", "frame_store"]).success
    # embedding is cheap and follows the frames at once; the codec waits for the retraining cron
    requested, _ = automation_requests(instance, cursor, now + datetime.timedelta(seconds=30), WATCHED)
    assert requested == {"structure_embeddings": ["paired"]}
    again = metadata(materialize(instance, resources, "paired", ["structure_embeddings"]))["structure_embeddings"]
    assert (again["computed"], again["cached"], again["frames_domain1"]) == (1, 20, 11)
    v2 = data_version(instance, "structure_embeddings", "paired")
    assert v2 != v1

    # nothing new: nothing computed, same version; the cache holds each frame once
    same = metadata(materialize(instance, resources, "paired", EMBED[1:]))["structure_embeddings"]
    assert (same["computed"], same["cached"], same["cache_rows"]) == (0, 21, 21)
    assert data_version(instance, "structure_embeddings", "paired") == v2
    cache = resources["rfp"].home_path() / "cache" / "embeddings" / "thumbnail16.parquet"
    assert pq.read_table(cache).num_rows == 21


def test_pairing_off_skips_without_weights_and_missing_weights_name_the_fix(project):
    # the default encoder is DINOv2, whose weights are not here: with pairing off nothing asks for them
    off = {**TINY_OVERRIDES, "structure": {"pairing": False}}
    missing = {
        **TINY_OVERRIDES,
        "structure": {"pairing": True, "encoder": "dinov2_vits14", "weights_path": "/nonexistent/dinov2.pth"},
    }
    root, resources, instance = project({"off": off, "noweights": missing}, n=4)
    md = metadata(materialize(instance, resources, "off", EMBED + ["structure_pairs"]))
    for key in ("structure_embeddings", "structure_pairs"):
        assert md[key]["skipped"] is True and "structure.pairing is off" in md[key]["reason"]
        assert data_version(instance, key, "off") == "skipped"
    result = materialize(instance, resources, "noweights", EMBED, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert failure.step_key == "structure_embeddings"
    cause = failure.event_specific_data.error.cause
    assert cause.cls_name == "WeightsMissingError" and "weights_path" in cause.message and "thumbnail" in cause.message


def test_pairs_feed_the_velocity_and_re_pairing_makes_it_stale(project):
    root, resources, instance = project({"paired": PAIRED})
    all_keys = EMBED + ["structure_pairs"] + TRAIN + ["evaluation_samples"]
    result = materialize(instance, resources, "paired", all_keys)
    assert result.success
    md = metadata(result)
    home = resources["rfp"].home_path() / "pipeline" / "paired"

    pairs_md = md["structure_pairs"]
    assert pairs_md["dagster/row_count"] == 10 * 3 and pairs_md["candidates"] == 3
    assert pairs_md["proof_sheet"].startswith("![") and "data:image/png;base64," in pairs_md["proof_sheet"]
    pairs_rec = json.loads((home / "pairs" / "result.json").read_text())
    table = pq.read_table(pairs_rec["pairs"])
    assert table.column_names == ["d0_key", "d1_key", "rank", "similarity"] and table.num_rows == 30
    assert sorted(set(table.column("rank").to_pylist())) == [0, 1, 2]
    sims = np.array(table.column("similarity").to_pylist()).reshape(10, 3)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # best first
    with Image.open(pairs_rec["proof_sheet"]) as sheet:  # 8 rows: a domain-0 frame + 3 matches each
        assert sheet.size == (2 + 50 + 6 + 3 * 50, 2 + 8 * 50)
    assert md["codec_checkpoint"]["skipped"] is True and "identity" in md["codec_checkpoint"]["reason"]

    # the velocity trained with these pairs: its inputs, its stage key and its MLflow run say so
    pairs_version = data_version(instance, "structure_pairs", "paired")
    assert md["velocity_checkpoint"]["built_from_pairs"] == pairs_version == pairs_rec["version"]
    vel_rec = json.loads((home / "velocity" / "result.json").read_text())
    assert vel_rec["built_from"]["pairs"] == pairs_version
    vel_event = instance.get_latest_materialization_event(dg.AssetKey("velocity_checkpoint"))
    # Dagster records a partitioned input as sha256 of its partitions' versions (here exactly one)
    recorded = vel_event.asset_materialization.tags["dagster/input_data_version/structure_pairs"]
    assert recorded == hashlib.sha256(pairs_version.encode()).hexdigest()
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(vel_rec["mlflow_run_id"])
    assert run.data.tags["pairs_version"] == pairs_version and run.data.params["structure.pairing"] == "True"
    assert "structure/proof_sheet.png" in {a.path for a in client.list_artifacts(run.info.run_id, "structure")}
    assert "data:image/png;base64," in md["evaluation_samples"]["grid"]

    # other embeddings (a re-trained encoder, say) re-pair the same frames: the velocity is stale, saliency not
    cache_path = resources["rfp"].home_path() / "cache" / "embeddings" / "thumbnail16.parquet"
    cache = pq.read_table(cache_path)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((cache.num_rows, 256)).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 256)
    pq.write_table(cache.set_column(1, "embedding", emb).replace_schema_metadata(cache.schema.metadata), cache_path)
    again = metadata(materialize(instance, resources, "paired", ["structure_embeddings", "structure_pairs"]))
    assert again["structure_embeddings"]["computed"] == 0
    assert data_version(instance, "structure_pairs", "paired") != pairs_version
    assert stale(instance, "velocity_checkpoint", "paired") == StaleStatus.STALE
    assert stale(instance, "saliency_checkpoint", "paired") == StaleStatus.FRESH


def test_sae_codec_and_dit_velocity_through_the_graph(project):
    import torch

    from rfp_core.inference.translate import Translator

    root, resources, instance = project({"vae": SAE_DIT})
    result = materialize(instance, resources, "vae", EMBED + ["structure_pairs"] + TRAIN + ["evaluation_samples"])
    assert result.success
    md = metadata(result)
    codec = md["codec_checkpoint"]
    assert codec["codec"] == "SAE" and codec["steps"] == 30 and codec["reused"] is False
    assert np.isfinite(codec["recon_l1"]) and codec["recon_l1"] < codec["recon_l1_init"]
    assert "data:image/png;base64," in codec["reconstructions"] and codec["mlflow_run"].startswith("http")
    assert md["structure_pairs"]["skipped"] is True  # pairing off here

    codec_version = data_version(instance, "codec_checkpoint", "vae")
    assert (
        md["saliency_checkpoint"]["built_from_codec"] == md["velocity_checkpoint"]["built_from_codec"] == codec_version
    )
    home = resources["rfp"].home_path() / "pipeline" / "vae"
    vel = json.loads((home / "velocity" / "result.json").read_text())
    tr = Translator.from_run(vel["checkpoint"], device="cpu")
    assert not tr.codec.is_identity and tr.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 8, 8)
    assert type(tr.net).__name__ == "DiT" and tr.cfg.codec.net.type == "SAE"

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("vae").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["codec", "saliency", "velocity"]
    codec_run = next(r for r in runs if r.data.tags["stage"] == "codec")
    # every listed loss is logged under its id
    assert {
        "codec/recon_l1",
        "codec/recon_l1_init",
        "codec/l1_loss",
        "codec/pix_con_loss",
        "codec/lat_con_loss",
    } <= set(codec_run.data.metrics)
    assert (
        next(r for r in runs if r.data.tags["stage"] == "velocity").data.tags["codec_run_id"] == codec_run.info.run_id
    )

    # nothing the codec reads changed: re-materialising keeps it (no new run, same version, training fresh)
    kept = metadata(materialize(instance, resources, "vae", ["codec_checkpoint"]))["codec_checkpoint"]
    assert kept["reused"] is True and kept["recon_l1"] == codec["recon_l1"]
    assert data_version(instance, "codec_checkpoint", "vae") == codec_version
    assert len(client.search_runs([codec_run.info.experiment_id], "tags.stage = 'codec'")) == 1
    assert stale(instance, "velocity_checkpoint", "vae") == StaleStatus.FRESH
