"""`rfp bench faults`: the audit finds what a kill can leave behind, and (slow) the whole campaign --
10 SIGKILLs across codec, saliency and velocity, through `rfp train` and through Dagster runs --
ends with the uninterrupted run's weights, bit for bit, and nothing orphaned or corrupt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rfp_core.bench.faults_check import audit, mismatches

ROOT = Path(__file__).resolve().parents[1]


def test_audit_finds_orphaned_temp_files_and_torn_files(tmp_path):
    home = tmp_path / "home"
    run = home / "runs" / "r"
    run.mkdir(parents=True)
    torch.save({"step": 1}, run / "velocity_00000001.pt")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (home / "pipeline").mkdir()
    assert audit(home) == ([], [])
    good = (run / "velocity_00000001.pt").read_bytes()
    (run / "velocity_00000002.pt").write_bytes(good[: len(good) // 2])  # torn by a crash of the disk
    (run / ".velocity.pt.~host-1~x.tmp").write_bytes(b"partial")  # a writer killed mid-write
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"ste')
    orphans, corrupt = audit(home)
    assert orphans == [str(run / ".velocity.pt.~host-1~x.tmp")]
    assert [c.split(":")[0] for c in corrupt] == [str(run / "metrics.jsonl"), str(run / "velocity_00000002.pt")]


def test_mismatches_name_each_differing_tensor():
    ref = {
        "codec": {"w": torch.zeros(2)},
        "saliency": {"w": torch.ones(2)},
        "velocity": {"a": torch.ones(1), "b": torch.ones(1)},
    }
    same = {k: {n: t.clone() for n, t in v.items()} for k, v in ref.items()}
    assert mismatches(ref, same) == []
    same["velocity"]["b"] = torch.ones(1) + 1e-7
    same["codec"] = None
    assert mismatches(ref, same) == ["codec: missing", "velocity: 1 of 2 tensors differ (first: b)"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fault_campaign_ten_kills_every_phase_both_launchers(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "rfp_core.cli", "bench", "faults", "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=3500,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kills"] == 10 and result["kills_rfp_train"] == 6 and result["kills_dagster"] == 4, result
    assert all(result["kills_by_phase"][p] >= 1 for p in ("codec", "saliency", "velocity")), result
    assert result["resumes"] == result["kills"]
    assert result["mismatches"] == 0 and result["orphaned_files"] == 0 and result["corrupt_files"] == 0, result
