"""Translator and the `rfp translate` / `rfp generate` commands on small trained runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from disc_data import make_discs
from PIL import Image

from rfp_core.cli import main
from rfp_core.config_files import config_from_dict
from rfp_core.inference.translate import Translator
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.images import load_image, save_grid
from rfp_core.media.ingest import ingest
from rfp_core.train.run import train_run
from rfp_core.train.velocity import train_velocity

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def _run(tmp: Path, generative: bool) -> Path:
    d0, d1 = make_discs(tmp / "data", n=8, size=32)
    raw = {
        **json.loads(TINY.read_text()),
        "loss": "mse",
        "train_batch_size": 4,
        "train_minibatch_size": 4,
        "train_images": 4 * 6,
        "sample_batch_size": 3,
    }
    if generative:  # the whole `rfp train` path with domain0 = random: no saliency phase
        run = train_run(config_from_dict(raw), "random", [d1], run_id="gen", device="cpu", progress=False)
        assert not (run / "saliency.pt").exists()
        return run
    store = FrameStore(max_side=64)
    report = ingest([d0], [d1], out=tmp / "m.parquet", store=store, progress=False)
    cfg = config_from_dict({**raw, "domain0": [str(d0)]})
    return train_velocity(cfg, report.manifest_path, tmp / "run", store=store, progress=False).checkpoint.parent


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("gen")
        mp.setenv("RFP_HOME", str(root / "home"))
        return _run(root, generative=True)


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("tr")
        mp.setenv("RFP_HOME", str(root / "home"))
        return _run(root, generative=False), root / "data"


def test_generate_cli_writes_n_reproducible_images(generative_run, tmp_path):
    args = ["generate", "--run", str(generative_run), "--num", "5", "--device", "cpu", "--steps", "3"]
    assert main([*args, "--out", str(tmp_path / "a"), "--seed", "7"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--seed", "7"]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "8"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"{i:05d}.png" for i in range(5)]
    assert Image.open(tmp_path / "a" / names[0]).size == (32, 32)
    same = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names]
    other = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "c" / n).read_bytes() for n in names]
    assert all(same) and not any(other)


def test_generate_refuses_a_translation_run(translation_run, tmp_path, capsys):
    run, _ = translation_run
    assert main(["generate", "--run", str(run), "--num", "2", "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "rfp translate" in capsys.readouterr().err


def test_euler_step_directions(translation_run):
    """One Euler step: forward is x + v(x, 0), reverse is x - v(x, 1), with the EMA net."""
    run, _ = translation_run
    tr = Translator.from_run(run / "velocity.pt", device="cpu")
    assert tr.size == 32 and not tr.generative
    x = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    v0 = tr.velocity(x, torch.zeros(2))
    v1 = tr.velocity(x, torch.ones(2))
    assert v0.abs().max() > 0  # trained away from the zero-initialised output
    torch.testing.assert_close(tr.translate(x, steps=1, sampler="euler"), (x + v0).clamp(-1, 1))
    torch.testing.assert_close(tr.translate(x, steps=1, sampler="euler", reverse=True), (x - v1).clamp(-1, 1))
    # the final checkpoint holds the EMA weights
    ema = torch.load(run / "velocity.pt", map_location="cpu", weights_only=True)["velocity"]
    assert all(torch.equal(ema[k], v) for k, v in tr.net.state_dict().items())


def test_translate_cli_folders_bad_files_and_repeated_stems(translation_run, tmp_path, capsys):
    run, data = translation_run
    nested = tmp_path / "in" / "sub"
    nested.mkdir(parents=True)
    Image.open(data / "domain0" / "d0_000.png").save(tmp_path / "in" / "same.png")
    Image.open(data / "domain0" / "d0_001.png").save(nested / "same.png")
    (nested / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "translate",
                "--run",
                str(run),
                str(tmp_path / "in"),
                str(data / "domain0" / "d0_002.png"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped" in err
    assert sorted(p.name for p in out.iterdir()) == ["d0_002.png", "same-2.png", "same.png"]
    assert main(["translate", "--run", str(run), str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_load_image_takes_the_centred_square():
    import tempfile

    a = np.zeros((32, 48, 3), np.uint8)
    a[:, :8] = (0, 255, 0)
    a[:, 8:40] = (255, 0, 0)
    a[:, 40:] = (0, 255, 0)
    with tempfile.TemporaryDirectory() as d:
        Image.fromarray(a).save(Path(d) / "wide.png")
        x = load_image(Path(d) / "wide.png", 16)
    assert x.shape == (3, 16, 16)
    assert x[0].min() > 0.9 and x[1].max() < -0.9  # red only: the green margins are cropped away


def test_save_grid_lays_rows_out(tmp_path):
    rows = [torch.full((4, 3, 32, 32), -1.0), torch.full((4, 3, 32, 32), 1.0)]
    path = save_grid(rows, tmp_path / "g.png")
    img = np.asarray(Image.open(path))
    assert img.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    assert img[2 + 16, 2 + 16].tolist() == [0, 0, 0] and img[36 + 16, 2 + 16].tolist() == [255, 255, 255]


def test_a_vae_codec_run_trains_and_translates_in_latent_space(tmp_path):
    d0, d1 = make_discs(tmp_path / "data", n=8, size=32)
    raw = {
        **json.loads(TINY.read_text()),
        "train_images": 8 * 3,
        "codec_train_images": 32,
        "codec_train_batch_size": 8,
        "codec_losses": [{"type": "L1Loss"}, {"type": "KLLoss"}],
        "codec_net": {
            "type": "VAE",
            "latent_channels": 4,
            "model_channels": 16,
            "ch_mult": [1, 2],
            "normalization": "GroupNormAuto",
            "num_res_blocks": 1,
        },
    }
    run = train_run(config_from_dict(raw), [d0], [d1], run_id="vae", device="cpu", progress=False)
    assert {"codec.pt", "saliency.pt", "velocity.pt"} <= {p.name for p in run.iterdir()}
    sal = torch.load(run / "saliency.pt", map_location="cpu", weights_only=True)
    assert sal["latent_input"] and sal["in_channels"] == 4
    tr = Translator.from_run(run, device="cpu")
    x = tr.load_images(sorted(d0.glob("*.png"))[:2])
    assert tr.encode(x).shape == (2, 4, 16, 16)
    y = tr.translate(x, steps=2)
    assert y.shape == (2, 3, 32, 32) and y.min() >= -1 and y.max() <= 1
