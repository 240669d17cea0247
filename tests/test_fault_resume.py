"""Exact resume of the phases before the velocity: a saliency (and codec) phase killed part way
and continued from its last checkpoint ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from disc_data import make_discs

from rfp_core.config_files import config_from_dict
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


class Killed(Exception):
    """Stands in for SIGKILL at a chosen step (raised from the metrics callback)."""


def kill_at(step: int):
    def log(metrics: dict, at: int) -> None:
        if at == step:
            raise Killed(at)

    return log


@pytest.fixture
def data(tmp_path):
    d0, d1 = make_discs(tmp_path / "data", n=12, size=32)
    store = FrameStore(max_side=64)
    return ingest([d0], [d1], out=tmp_path / "manifest.parquet", store=store, progress=False).manifest_path, store


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("warmup, killed_in_1b", [(0.6, False), (0.3, True)])
def test_saliency_resume_is_exact(tmp_path, data, warmup, killed_in_1b):
    from rfp_core.train.saliency import train_saliency

    manifest, store = data
    # augmentations and blends draw random numbers: resume must continue them, not only the weights.
    # warm-up threshold 0.6: 1a lasts until the end (measured); 0.3: 1b from step 2 on
    cfg = config_from_dict(
        json.loads(TINY.read_text()),
        overrides={
            "saliency": {
                "stop_on": "holdout",
                "learning_rate": 1e-5,
                "accuracy_threshold": 0.95,
                "warmup_threshold": warmup,
                "eval_every": 2,
                "max_steps": 60,
                "batch_size": 8,
                "blend_fraction": 0.5,
                "augmentations": ["hflip"],
                "checkpoint_every_steps": 3,
            }
        },
    )
    logged: list[tuple[int, dict]] = []
    straight = train_saliency(
        cfg, manifest, tmp_path / "a", store=store, progress=False, log=lambda m, at: logged.append((at, m))
    )
    evals = [at for at, m in logged if m.get("saliency/warmed_up") == float(killed_in_1b) and 4 < at < straight.steps]
    assert evals, [(at, m.get("saliency/warmed_up")) for at, m in logged]
    kill = evals[len(evals) // 2]  # at an evaluation, before that step's checkpoint
    with pytest.raises(Killed):
        train_saliency(cfg, manifest, tmp_path / "b", store=store, progress=False, log=kill_at(kill))
    ckpt = torch.load(tmp_path / "b" / "saliency.pt", weights_only=True)
    assert 0 < ckpt["steps"] < kill and ckpt["backbone_warmed_up"] == killed_in_1b and "optimizer" in ckpt
    resumed = train_saliency(cfg, manifest, tmp_path / "b", store=store, progress=False)
    assert resumed.steps == straight.steps and resumed.accuracy == straight.accuracy
    a = torch.load(straight.checkpoint, weights_only=True)["saliency"]
    b = torch.load(resumed.checkpoint, weights_only=True)["saliency"]
    assert _equal(a, b)


def test_codec_resume_is_exact(tmp_path, data):
    from rfp_core.train.codec import train_codec

    manifest, store = data
    vae = {
        "type": "VAE",
        "latent_channels": 4,
        "model_channels": 8,
        "ch_mult": [1, 2],
        "normalization": "GroupNormAuto",
        "num_res_blocks": 1,
    }
    # the VAE samples its latent and the augmentation flips: both draw from the RNG
    cfg = config_from_dict(
        {
            "max_size": 16,
            "seed": 0,
            "codec": {
                "net": vae,
                "losses": [{"type": "L1Loss", "id": "recon"}, {"type": "KLLoss", "weight": 1e-6}],
                "learning_rate": 3e-3,
                "train_batch_size": 8,
                "train_minibatch_size": 4,
                "train_images": 8 * 12,
                "augmentations": ["hflip"],
                "checkpoint_every_steps": 4,
            },
        }
    )
    straight = train_codec(cfg, manifest, tmp_path / "a", store=store, progress=False)
    assert straight.steps == 12
    with pytest.raises(Killed):  # killed at step 12 (logged at the last step): the step-8 checkpoint is the last
        train_codec(cfg, manifest, tmp_path / "b", store=store, progress=False, log=kill_at(12))
    ckpt = torch.load(tmp_path / "b" / "codec.pt", weights_only=True)
    assert ckpt["steps"] == 8 and not ckpt["finished"]
    resumed = train_codec(cfg, manifest, tmp_path / "b", store=store, progress=False)
    assert resumed.steps == 12 and resumed.recon_l1 == straight.recon_l1
    a = torch.load(straight.checkpoint, weights_only=True)["codec"]
    b = torch.load(resumed.checkpoint, weights_only=True)["codec"]
    assert _equal(a, b)


def test_saliency_resumes_from_the_checkpoint_when_a_kill_left_the_state_file_behind(tmp_path, data):
    """save() writes saliency.pt, then saliency_state.json: a kill between the two leaves the state
    file one checkpoint older than the weights, optimizer and RNG beside it."""
    from rfp_core.train.saliency import train_saliency

    manifest, store = data
    cfg = config_from_dict(
        json.loads(TINY.read_text()),
        overrides={
            "saliency": {
                "stop_on": "holdout",
                "learning_rate": 1e-5,
                "accuracy_threshold": 0.95,
                "warmup_threshold": 0.3,
                "eval_every": 2,
                "max_steps": 60,
                "batch_size": 8,
                "augmentations": ["hflip"],
                "checkpoint_every_steps": 3,
            }
        },
    )
    straight = train_saliency(cfg, manifest, tmp_path / "a", store=store, progress=False)
    run = tmp_path / "b"
    with pytest.raises(Killed):
        train_saliency(cfg, manifest, run, store=store, progress=False, log=kill_at(8))
    older = (run / "saliency_state.json").read_text()  # the state at step 6
    with pytest.raises(Killed):
        train_saliency(cfg, manifest, run, store=store, progress=False, log=kill_at(12))
    assert torch.load(run / "saliency.pt", weights_only=True)["steps"] == 9
    (run / "saliency_state.json").write_text(older)  # as if killed right after the step-9 checkpoint
    resumed = train_saliency(cfg, manifest, run, store=store, progress=False)
    assert resumed.steps == straight.steps
    assert _equal(
        torch.load(straight.checkpoint, weights_only=True)["saliency"],
        torch.load(resumed.checkpoint, weights_only=True)["saliency"],
    )
