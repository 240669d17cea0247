"""`rfp bench run`: a whole training timed phase by phase, on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rfp_core.bench.run import _training_rate, run
from rfp_core.config import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def test_bench_run_times_every_phase_of_a_real_training(tmp_path):
    cfg = {
        **json.loads(TINY.read_text()),
        "saliency_max_steps": 40,
        "saliency_accuracy_threshold": 0.6,
        "saliency_warmup_threshold": 0.55,
        "train_images": 32,
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = run(quick=True, device="cpu", config=str(path))
    assert out["phases"] == ["saliency", "velocity"]
    assert out["saliency_s"] > 0 and out["velocity_s"] > 0 and out["ingest_s"] > 0
    assert out["total_s"] == pytest.approx(out["ingest_s"] + out["saliency_s"] + out["velocity_s"])
    run_dir = Path(out["run_dir"])
    assert (run_dir / "saliency.pt").is_file() and (run_dir / "velocity.pt").is_file()
    # the speeds of the finished run, beside the phase times
    rates = ["velocity_images_per_s", "data_samples_per_s", "saliency_eval_ms", "saliency_eval_share"]
    for key in rates:
        assert isinstance(out[key], float) and out[key] > 0, key
    assert out["data_path_faster_than_training"] is (out["data_samples_per_s"] > out["velocity_images_per_s"])
    state = json.loads((run_dir / "saliency_state.json").read_text())
    assert out["saliency_steps"] == state["steps"] > 0
    assert out["saliency_evals"] == state["steps"] // 10 + (state["steps"] == 40 and state["steps"] % 10 != 0)
    speeds = out["translate_images_per_s"]
    assert set(speeds) == {"1", "12"} and all(v > 0 for v in speeds.values())
    assert speeds["1"] > speeds["12"]  # the steps reach the sampler: 12 velocity calls cost more than one


def test_bench_run_names_a_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        run(quick=True, config=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="needs --config"):
        run(quick=True)


def test_bench_run_training_rate_weights_each_logged_window_by_its_images(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 2, "images": 16, "images_per_s": 8.0}, {"step": 4, "images": 32, "images_per_s": 16.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _training_rate(metrics) == pytest.approx(32 / (16 / 8 + 16 / 16))  # not the mean of 8 and 16
