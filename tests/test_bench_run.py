"""`rfp bench run`: a whole training timed phase by phase, on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rfp_core.bench.run import run
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


def test_bench_run_names_a_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        run(quick=True, config=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="needs --config"):
        run(quick=True)
