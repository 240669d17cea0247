"""End to end on CPU: the tiny config (original flat format) trains phase 1 and phase 2 on generated
warm-flat vs cool-striped discs; `rfp translate` then writes one output per input, both directions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from disc_data import make_discs
from PIL import Image

from rfp_core.cli import main
from rfp_core.config_files import config_from_dict, load_config
from rfp_core.media.datasets import FrameDataset
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.train.run import smoke_config, train_run
from rfp_core.train.saliency import SaliencyThresholdNotReached, load_saliency, train_saliency

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    d0, d1 = make_discs(root / "data", n=24, size=32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RFP_HOME", str(root / "home"))
        run = train_run(load_config(TINY), [d0], [d1], run_id="tiny", device="cpu", progress=False)
        store = FrameStore(max_side=512)
        yield run, d0, d1, store


def test_tiny_config_is_in_the_original_flat_format():
    raw = json.loads(TINY.read_text())
    assert "velocity_net" in raw and "saliency_net" in raw
    assert not {"velocity", "saliency", "codec"} & raw.keys()
    cfg = load_config(TINY)
    assert cfg.max_size == 32 and cfg.saliency.net.backbone == "resnet18" and not cfg.saliency.net.pretrained


def test_run_folder_holds_every_artefact(trained):
    run, *_ = trained
    for name in (
        "config.json",
        "manifest.parquet",
        "saliency.pt",
        "saliency_state.json",
        "velocity.pt",
        "metrics.jsonl",
    ):
        assert (run / name).is_file(), name
    assert list((run / "samples").glob("step_*.png"))
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.domain0 and cfg.domain1  # the resolved config names the folders it was trained on


def test_saliency_reaches_its_threshold_on_held_out_frames(trained):
    run, _, _, store = trained
    cfg = load_config(TINY)
    state = json.loads((run / "saliency_state.json").read_text())
    assert state["backbone_warmed_up"] is True
    assert state["accuracy"] >= cfg.saliency.accuracy_threshold
    # measure again, independently, on the held-out frames the training never saw
    net = load_saliency(run / "saliency.pt")
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    accs = []
    for domain in (0, 1):
        # tiny.json stops on held-out frames: the half of the held-out sources that decides the stop
        ds = FrameDataset(run / "manifest.parquet", store, domain, 32, split="stop", train_crop=False)
        train_keys = set(FrameDataset(run / "manifest.parquet", store, domain, 32, split="train").frame_keys)
        assert not train_keys & set(ds.frame_keys)
        with torch.no_grad():
            pred = net(torch.stack([ds[i] for i in range(len(ds))])).argmax(1)
        accs.append(float((pred == domain).float().mean()))
    assert sum(accs) / 2 == pytest.approx(state["accuracy"])


def test_velocity_loss_falls(trained):
    run, *_ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(TINY)
    assert rows[-1]["step"] == cfg.velocity.total_steps
    losses = [r["loss"] for r in rows]
    third = max(1, len(losses) // 3)
    early, late = np.mean(losses[:third]), np.mean(losses[-third:])
    assert late < 0.7 * early, (early, late)
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in rows)


def test_metrics_log_the_two_loss_terms_apart(trained):
    run, *_ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    w = load_config(TINY).velocity.mse_weight
    for r in rows:
        assert r["loss_saliency"] > 0 and r["loss_mse"] > 0
        # loss = saliency term + mse_weight x plain MSE, window by window
        assert r["loss"] == pytest.approx(r["loss_saliency"] + w * r["loss_mse"], rel=1e-5)


def test_checkpoints_load_with_weights_only(trained):
    run, *_ = trained
    for path in [run / "saliency.pt", run / "velocity.pt", *run.glob("velocity_*.pt")]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(state["config"], dict)
    final = torch.load(run / "velocity.pt", map_location="cpu", weights_only=True)
    assert final["step"] == load_config(TINY).velocity.total_steps


def test_a_resumed_call_skips_the_finished_saliency_phase(trained):
    run, _, _, store = trained
    before = json.loads((run / "saliency_state.json").read_text())
    mtime = (run / "saliency.pt").stat().st_mtime_ns
    result = train_saliency(load_config(TINY), run / "manifest.parquet", run, store=store, progress=False)
    assert result.steps == before["steps"] and result.warmed_up
    assert (run / "saliency.pt").stat().st_mtime_ns == mtime


def _disc_hue(path: Path) -> tuple[float, float]:
    """Mean (red, blue) of the pixels far from the grey background (the disc)."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(float)
    fg = np.abs(a - 128).sum(-1) > 90
    return float(a[fg][:, 0].mean()), float(a[fg][:, 2].mean())


def test_translate_cli_forward_and_reverse(trained, tmp_path):
    run, d0, d1, _ = trained
    files = sorted(d0.glob("*.png"))[:3]
    out = tmp_path / "fwd"
    assert main(["translate", "--run", str(run), *map(str, files), "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f.stem + ".png" for f in files)
    for f in files:
        assert Image.open(out / f"{f.stem}.png").size == (32, 32)
    # warm discs come out cooler: the blue share of the disc rises
    red0, blue0 = np.mean([_disc_hue(f) for f in files], axis=0)
    red1, blue1 = np.mean([_disc_hue(out / f"{f.stem}.png") for f in files], axis=0)
    assert blue1 - red1 > blue0 - red0 + 20, ((red0, blue0), (red1, blue1))

    back = tmp_path / "back"
    assert (
        main(
            [
                "translate",
                "--run",
                str(run),
                str(d1),
                "--out",
                str(back),
                "--reverse",
                "--steps",
                "2",
                "--sampler",
                "heun",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert sorted(p.stem for p in back.iterdir()) == sorted(p.stem for p in d1.glob("*.png"))


def test_unreachable_threshold_stops_with_a_clear_error(tmp_path):
    # two folders of the same style: nothing to tell apart, so no threshold of 1.0 is reachable
    d0, _ = make_discs(tmp_path / "a", n=12, size=32, seed=0)
    d1, _ = make_discs(tmp_path / "b", n=12, size=32, seed=1)
    store = FrameStore(max_side=64)
    report = ingest([d0], [d1], out=tmp_path / "m.parquet", store=store, progress=False)
    cfg = config_from_dict(
        json.loads(TINY.read_text()),
        overrides={
            "saliency": {
                "max_steps": 2,
                "eval_every": 1,
                "warmup_threshold": 1.0,
                "accuracy_threshold": 1.0,
                "learning_rate": 1e-9,
            }
        },
    )
    with pytest.raises(SaliencyThresholdNotReached) as err:
        train_saliency(cfg, report.manifest_path, tmp_path / "run", store=store, progress=False)
    msg = str(err.value)
    assert "max_steps=2" in msg and "warmup_threshold 1.0" in msg and "accuracy" in msg
    # the partial phase is kept, so more steps continue it instead of starting over
    state = json.loads((tmp_path / "run" / "saliency_state.json").read_text())
    assert state["steps"] == 2 and state["backbone_warmed_up"] is False


def test_without_max_steps_the_saliency_phase_ends_at_the_originals_limit_and_goes_on(tmp_path, capsys):
    # the original's loop: at most velocity.train_images // velocity.train_batch_size steps, then on
    d0, _ = make_discs(tmp_path / "a", n=12, size=32, seed=0)
    d1, _ = make_discs(tmp_path / "b", n=12, size=32, seed=1)
    store = FrameStore(max_side=64)
    report = ingest([d0], [d1], out=tmp_path / "m.parquet", store=store, progress=False)
    raw = {k: v for k, v in json.loads(TINY.read_text()).items() if k != "saliency_max_steps"}
    cfg = config_from_dict(
        raw,
        overrides={
            "velocity": {"train_images": 3 * 8, "train_batch_size": 8},
            "saliency": {"eval_every": 1, "warmup_threshold": 1.0, "accuracy_threshold": 1.0},
        },
    )
    assert cfg.saliency.max_steps is None and cfg.saliency_step_limit == 3
    result = train_saliency(cfg, report.manifest_path, tmp_path / "run", store=store, progress=False)
    state = json.loads((tmp_path / "run" / "saliency_state.json").read_text())
    assert state["steps"] == 3 and state["stopped_by"] == "step_limit" and result.checkpoint.exists()
    assert 0 < result.accuracy <= 1  # as the original returns: the last batch's, the window not being full
    assert "the original trainer's limit" in capsys.readouterr().err


def test_dev_flag_shrinks_the_budget_and_a_missing_device_is_refused(tmp_path, capsys):
    cfg = smoke_config(load_config(TINY))
    assert cfg.velocity.total_steps == 20 and cfg.saliency.max_steps <= 500
    assert cfg.velocity.learning_rate == load_config(TINY).velocity.learning_rate  # only the budget changes
    d0, d1 = make_discs(tmp_path / "data", n=2, size=32)
    rc = main(
        [
            "train",
            "-c",
            str(TINY),
            "-d0",
            str(d0),
            "-d1",
            str(d1),
            "--device",
            "cuda:7" if not torch.cuda.is_available() else "mps",
            "--dev",
        ]
    )
    assert rc == 2 and "not available" in capsys.readouterr().err
    assert main(["train", "-c", str(TINY), "-d1", str(d1)]) == 2
    assert "--domain0" in capsys.readouterr().err


def test_the_recommended_recipe_trains_from_the_cli_with_its_noise_and_pairing(tmp_path, monkeypatch, capsys):
    # configs/translate.json as the README gives it (the --smoke budget): structure pairing writes its
    # pairs, the run records the source noise, and the translation starts from noisy inputs
    from rfp_core.inference.translate import Translator

    monkeypatch.setenv("RFP_HOME", str(tmp_path / "home"))
    recipe = Path(__file__).resolve().parents[1] / "configs" / "translate.json"
    d0, d1 = make_discs(tmp_path / "data", n=10, size=32)
    assert main(["train", "-c", str(recipe), "-d0", str(d0), "-d1", str(d1), "--smoke", "--run-id", "recipe"]) == 0
    run = tmp_path / "home" / "runs" / "recipe"
    # plain MSE, but the translation's retry asks the domain classifier: phase 1 trains it
    assert (run / "pairs.parquet").is_file() and (run / "saliency.pt").is_file()
    tr = Translator.from_run(run, "cpu")
    assert tr.critic is not None and tr.cfg.velocity.translate_retry_noise
    assert tr.cfg.velocity.source_noise == 0.5 and tr.cfg.structure.pairing
    x = tr.load_images(sorted(d0.glob("*.png"))[:2])
    sigma = tr.cfg.velocity.translate_sigma  # the noise it translates with (translate_noise, else 0.5)
    assert sigma > 0 and float((tr.start(x) - tr.encode(x)).std()) == pytest.approx(sigma, rel=0.2)
    assert tr.translate(x).shape == x.shape
    # `rfp translate` gives a video's frames one shared draw and each still its own
    from media_factory import make_video

    seen = []
    real_start = Translator.start
    monkeypatch.setattr(
        Translator,
        "start",
        lambda self, x, shared_noise=False, **kw: seen.append(shared_noise) or real_start(self, x, shared_noise, **kw),
    )
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    make_video(inputs / "clip.mp4", n_frames=6, size=32)
    (inputs / "still.png").write_bytes(next(d0.glob("*.png")).read_bytes())
    assert main(["translate", "--run", str(run), str(inputs), "--out", str(tmp_path / "out")]) == 0
    assert True in seen and False in seen
    assert (tmp_path / "out" / "still.png").is_file()
    # `--noise 0`: the same run translates from the clean input
    still_png = str(inputs / "still.png")
    assert main(["translate", "--run", str(run), still_png, "--out", str(tmp_path / "clean"), "--noise", "0"]) == 0
    still = tr.load_images([inputs / "still.png"])
    clean = Translator.from_run(run, "cpu").set_translate_noise(0.0).translate(still)[0]
    written = tr.load_images([tmp_path / "clean" / "still.png"])[0]
    assert (written - clean).abs().max() <= 2 / 255 + 1e-6
    assert (written - tr.translate(still)[0]).abs().max() > 4 / 255
