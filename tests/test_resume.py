"""Training survives being killed: SIGKILL + `--checkpoint` finishes the run; resume is exact; a
corrupted newest checkpoint falls back to the previous one; a NaN loss stops with the last good
checkpoint kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from disc_data import make_discs

from rfp_core.checkpoint import load_latest
from rfp_core.config_files import config_from_dict
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.paths import runs_dir
from rfp_core.train.velocity import NonFiniteLoss, train_velocity

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def _tiny_raw(**flat) -> dict:
    return {**json.loads(TINY.read_text()), **flat}


@pytest.fixture
def data(tmp_path):
    d0, d1 = make_discs(tmp_path / "data", n=12, size=32)
    store = FrameStore(max_side=64)
    report = ingest([d0], [d1], out=tmp_path / "manifest.parquet", store=store, progress=False)
    return d0, d1, report.manifest_path, store


def _mse_cfg(**flat):
    # the saliency phase is not what these tests are about: plain MSE keeps them fast
    return config_from_dict(_tiny_raw(loss="mse", train_batch_size=8, train_minibatch_size=4, **flat))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["velocity"]


def test_sigkill_during_velocity_then_checkpoint_resume_finishes_the_run(tmp_path):
    d0, d1 = make_discs(tmp_path / "data", n=16, size=32)
    cfg_path = tmp_path / "tiny_resume.json"
    cfg_path.write_text(json.dumps(_tiny_raw(train_images=8 * 40, checkpoint_every_steps=5, sample_every_images=10**6)))
    total = config_from_dict(json.loads(cfg_path.read_text())).velocity.total_steps
    cmd = [
        sys.executable,
        "-m",
        "rfp_core.cli",
        "train",
        "-c",
        str(cfg_path),
        "-d0",
        str(d0),
        "-d1",
        str(d1),
        "--run-id",
        "killed",
        "--device",
        "cpu",
    ]
    run = runs_dir() / "killed"
    # one thread: on a busy machine, two spinning OpenMP threads per process slow tiny nets many times over
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and not list(run.glob("velocity_*.pt")):
        assert time.monotonic() < deadline, "no intermediate checkpoint appeared"
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "velocity.pt").exists()
    checkpoint = sorted(run.glob("velocity_*.pt"))[-1]
    killed_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
    assert 0 < killed_at < total
    saliency_steps = json.loads((run / "saliency_state.json").read_text())["steps"]

    done = subprocess.run(cmd + ["--checkpoint", str(checkpoint)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {checkpoint} at step {killed_at}/{total}" in done.stderr
    final = torch.load(run / "velocity.pt", map_location="cpu", weights_only=True)
    assert final["step"] == total and final["velocity"]
    # the saliency phase was finished before the kill and is not trained again
    assert json.loads((run / "saliency_state.json").read_text())["steps"] == saliency_steps
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == total  # no step logged twice


def test_resume_is_exact_and_a_corrupted_newest_checkpoint_falls_back(tmp_path, data):
    _, _, manifest, store = data
    cfg = _mse_cfg(train_images=8 * 8, checkpoint_every_steps=3, sample_every_images=10**6)
    straight = train_velocity(cfg, manifest, tmp_path / "a", store=store, progress=False)
    assert straight.steps == 8
    kept = sorted(p.name for p in (tmp_path / "a").glob("velocity_*.pt"))
    assert kept == ["velocity_00000006.pt", "velocity_00000008.pt"]  # the last two only

    # resume from step 6 in a fresh folder: the same final weights, bit for bit
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "velocity_00000006.pt", tmp_path / "b" / "from6.pt")
    resumed = train_velocity(
        cfg, manifest, tmp_path / "b", store=store, progress=False, resume_from=tmp_path / "b" / "from6.pt"
    )
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the newest checkpoint is corrupt (a crash of the disk, not of the writer): the previous one is used
    (tmp_path / "c").mkdir()
    for name in kept:
        shutil.copy(tmp_path / "a" / name, tmp_path / "c" / name)
    newest = tmp_path / "c" / "velocity_00000008.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping unusable checkpoint .*velocity_00000008.pt"):
        path, state = load_latest(tmp_path / "c", "velocity")
    assert path.name == "velocity_00000006.pt" and state["step"] == 6
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        recovered = train_velocity(cfg, manifest, tmp_path / "c", store=store, progress=False)
    c = _weights(recovered.checkpoint)
    assert recovered.steps == 8 and all(torch.equal(a[k], c[k]) for k in a)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, data):
    _, _, manifest, store = data
    cfg = _mse_cfg(
        train_images=8 * 20,
        checkpoint_every_steps=1,
        learning_rate=1e30,
        gradient_clip=0,
        warmup_fraction=0.0,
        lr_schedule="constant",
    )
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss) as err:
        train_velocity(cfg, manifest, out, store=store, progress=False)
    msg = str(err.value)
    assert "learning_rate" in msg and "velocity_" in msg
    assert not (out / "velocity.pt").exists()
    path, state = load_latest(out, "velocity")
    assert path.name in msg and torch.isfinite(torch.cat([v.flatten() for v in state["model"].values()])).all()
