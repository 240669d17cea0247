"""An original trainer's run folder, used here: continue it, import its parts, split with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from disc_data import make_discs

from rfp_core.checkpoint import load_checkpoint
from rfp_core.cli import build_parser
from rfp_core.config_files import config_from_dict
from rfp_core.original import checkpoint_step, find_original_run, load_state
from rfp_core.train.run import Imports, default_run_id, train_run

RUN = Path(__file__).parent / "fixtures" / "original" / "runs" / "unet_identity"


def _small(cfg_path: Path):
    raw = json.loads(cfg_path.read_text())
    raw["velocity"].update(
        {
            "train_images": 4 * 2,
            "train_batch_size": 4,
            "train_minibatch_size": 4,
            "sample_batch_size": 2,
            "sample_every_images": 10**6,
        }
    )
    return config_from_dict(raw)


def test_checkpoint_step_is_read_from_the_file_name_as_the_original_does():
    assert checkpoint_step("velocity_run_202601011200_001000.ckpt") == 1000
    assert checkpoint_step(RUN / "velocity_fixture_000010.ckpt") == 10
    assert checkpoint_step(RUN / "velocity_fixture_final_ema.ckpt") is None
    found = find_original_run(RUN)
    assert (
        found.velocity.name == "velocity_fixture_final_ema.ckpt"
        and found.saliency.name == "saliency_fixture_000010.ckpt"
    )


def test_continue_an_original_velocity_with_its_saliency(tmp_path):
    d0, d1 = make_discs(tmp_path / "data", n=6, size=32)
    imports = Imports(saliency=RUN / "saliency_fixture_000010.ckpt", velocity=RUN / "velocity_fixture_000010.ckpt")
    run = train_run(
        _small(RUN / "config.json"), [d0], [d1], run_id="cont", device="cpu", progress=False, imports=imports
    )
    final = load_checkpoint(run / "velocity.pt")
    # the original continues counting from the checkpoint's step and trains a fresh budget after it
    assert final["step"] == 10 + 2
    assert not (run / "saliency.pt").exists()  # phase 1 was not trained: the imported net was used
    imported = load_checkpoint(run / "saliency_imported.pt")
    _, original = load_state(RUN / "saliency_fixture_000010.ckpt")
    assert torch.equal(imported["saliency"]["latent_proj.weight"], original["latent_proj.weight"])
    # training moved the weights away from the checkpoint's, starting from them
    _, start = load_state(RUN / "velocity_fixture_000010.ckpt")
    moved = final["velocity"]["input_block.0.weight"] - start["input_block.0.weight"]
    assert 0 < moved.abs().max() < 0.1


def test_saliency_only_and_codec_only_stop_after_their_phase(tmp_path):
    d0, d1 = make_discs(tmp_path / "data", n=4, size=32)
    imports = Imports(saliency=RUN / "saliency_fixture_000010.ckpt")
    run = train_run(
        _small(RUN / "config.json"),
        [d0],
        [d1],
        run_id="sal",
        device="cpu",
        progress=False,
        imports=imports,
        only="saliency",
    )
    assert (run / "saliency_imported.pt").is_file() and not (run / "velocity.pt").exists()
    run = train_run(_small(RUN / "config.json"), [d0], [d1], run_id="codec", device="cpu", progress=False, only="codec")
    assert not (run / "saliency.pt").exists() and not (run / "velocity.pt").exists()


def test_the_original_command_line_parses():
    args = build_parser().parse_args(
        [
            "train",
            "-c",
            "c.json",
            "-d0",
            "a",
            "-d1",
            "b",
            "--codec-ckpt",
            "x.ckpt",
            "--saliency-ckpt",
            "s.ckpt",
            "--velocity-ckpt",
            "v.ckpt",
            "--saliency-only",
            "--dev",
        ]
    )
    assert (args.codec_ckpt, args.saliency_ckpt, args.velocity_ckpt, args.saliency_only, args.dev) == (
        "x.ckpt",
        "s.ckpt",
        "v.ckpt",
        True,
        True,
    )
    split = build_parser().parse_args(["split", "-ckpt", str(RUN), "-i", "in", "-o", "out", "-t", "0.8"])
    assert (split.run, split.input, split.output, split.threshold) == (str(RUN), ["in"], "out", 0.8)
    assert default_run_id(dev=True).startswith("run_") and default_run_id(dev=True).endswith("_dev")


def test_split_with_an_original_run_folder(tmp_path):
    from rfp_core.inference.split import split_folder

    d0, d1 = make_discs(tmp_path / "data", n=3, size=32)
    report = split_folder(RUN, [d0, d1], tmp_path / "sorted", threshold=0.6, device="cpu", progress=False)
    sorted_files = [p for sub in ("domain0", "domain1", "uncertain") for p in (tmp_path / "sorted" / sub).glob("*")]
    assert len(sorted_files) == 6 and report is not None


@pytest.mark.parametrize("name", ["dit_identity", "sae_dit"])
def test_generate_from_an_original_run_folder(name, tmp_path):
    from rfp_core.inference.translate import Translator

    tr = Translator.from_run(RUN.parent / name, device="cpu")
    assert tr.cfg.velocity.num_inference_steps == 6 and tr.cfg.velocity.sampler == "euler"
    images = tr.generate(2, seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    torch.testing.assert_close(images, tr.generate(2, seed=0))  # reproducible by seed


def test_rfp_train_trains_an_sae_and_a_dit_and_tracks_them_in_mlflow(tmp_path):
    import mlflow

    from rfp_core.cli import main

    d0, d1 = make_discs(tmp_path / "data", n=6, size=16)
    sae = {
        "type": "SAE",
        "latent_channels": 4,
        "model_channels": 8,
        "ch_mult": [1, 2],
        "normalization": "GroupNormAuto",
        "num_res_blocks": 1,
    }
    cfg = {
        "type": "RFPix2pixModel",
        "max_size": 16,
        "codec": {
            "type": "Codec",
            "net": sae,
            "train_images": 8 * 6,
            "train_batch_size": 8,
            "learning_rate": 3e-3,
            "losses": [{"type": "L1Loss"}, {"type": "SAELatentConsistencyLoss", "weight": 0.1}],
        },
        "velocity": {
            "type": "Velocity",
            "net": {"type": "DiT", "patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 4},
            "train_images": 4 * 3,
            "train_batch_size": 4,
            "train_minibatch_size": 4,
            "sample_batch_size": 2,
            "num_inference_steps": 2,
        },
        "saliency": {
            "type": "Saliency",
            "net": {"type": "ResNetSaliencyNet", "pretrained": False, "latent_channels": 8},
            "accuracy_threshold": 0.5,
            "warmup_threshold": 0.5,
            "batch_size": 4,
            "eval_every": 2,
            "holdout_fraction": 0.35,
            "smoothing_window": 10,
        },
    }  # no max_steps: the saliency phase stops at the original's limit, the velocity budget's 3 steps
    path = tmp_path / "dit.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "-c", str(path), "-d0", str(d0), "-d1", str(d1), "--run-id", "dit", "--device", "cpu"]) == 0
    from rfp_core.inference.translate import Translator
    from rfp_core.paths import runs_dir

    tr = Translator.from_run(runs_dir() / "dit", device="cpu")
    assert type(tr.net).__name__ == "DiT" and tr.translate(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    assert type(tr.codec).__name__ == "SAE" and tr.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 8, 8)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("rfp-train")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "dit" and run.data.params["velocity.net.type"] == "DiT"
    assert {"velocity/loss", "saliency/accuracy", "codec/l1_loss", "codec/lat_con_loss"} <= set(run.data.metrics)


def test_the_mlflow_pyfunc_serves_an_original_run_folder(tmp_path):
    import mlflow
    import numpy as np
    from PIL import Image

    from rfp_core import paths
    from rfp_core.inference.translate import Translator
    from rfp_pipeline import pyfunc_model

    target = tmp_path / "model"
    mlflow.pyfunc.save_model(
        str(target),
        python_model=Path(pyfunc_model.__file__),
        artifacts={pyfunc_model.CHECKPOINT: str(RUN)},
        code_paths=[str(paths.PACKAGE_DIR)],
    )
    model = mlflow.pyfunc.load_model(str(target))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((RUN / "inputs").glob("*.png"))[:2]])
    out = model.predict(images)
    tr = Translator.from_run(RUN, device="cpu")
    want = tr.translate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    want = ((want.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 32, 32, 3) and np.abs(out.astype(int) - want.astype(int)).max() <= 1
