"""`rfp bench faults`: SIGKILL training at random moments in every phase, resume, compare.

A tiny config (32 px, a VAE codec, the saliency net, the velocity UNet, all checkpointing every
few steps) is trained once uninterrupted (`rfp train`, the reference). Then it is trained again
while being killed: 6 kills through `rfp train` subprocesses (2 in each of codec, saliency,
velocity) and 4 through Dagster runs (`python -m rfp_pipeline.fault_worker`: the process that
executes the run; kills in codec, saliency and twice in velocity), each relaunch resuming from
the run folder / stage folders. A kill lands at a uniformly random moment within the first 40%
of the target phase's reference duration, after the phase is seen to have started (from its
files); a run that finishes before its kills are done is followed by another in a fresh folder.
Every run must finish; on CPU the final codec, saliency and velocity weights must equal
the reference's bit for bit; no temp file (`*.tmp`) may remain and every checkpoint, parquet,
JSON, metrics line and stored frame must read back. The last line is one JSON object: kills,
resumes, mismatches, corrupt and orphaned files, wall time.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rfp_core.bench.faults_check import audit, mismatches, weights
from rfp_core.bench.faults_drive import PHASES, Channel, Tally, drive

RFP_TARGETS = ["codec", "codec", "saliency", "saliency", "velocity", "velocity"]
DAGSTER_TARGETS = ["codec", "saliency", "velocity", "velocity"]
SALIENCY_THRESHOLD = 0.95

# the tiny three-phase config: every phase some seconds on a busy CPU, checkpointing every few steps
_CODEC = {
    "net": {
        "type": "VAE",
        "latent_channels": 4,
        "model_channels": 8,
        "ch_mult": [1, 2],
        "normalization": "GroupNormAuto",
        "num_res_blocks": 1,
    },
    "losses": [{"type": "L1Loss", "id": "recon"}, {"type": "KLLoss", "weight": 1e-6}],
    "learning_rate": 3e-3,
    "train_batch_size": 8,
    "train_images": 8 * 150,
    "lr_schedule": "constant",
    "checkpoint_every_steps": 2,
}
_SALIENCY = {
    "net": {
        "type": "ResNetSaliencyNet",
        "backbone": "resnet18",
        "num_classes": 2,
        "pretrained": False,
        "latent_channels": 8,
    },
    "stop_on": "holdout",
    "learning_rate": 1e-5,
    "accuracy_threshold": SALIENCY_THRESHOLD,
    "warmup_threshold": 0.7,
    "eval_every": 2,
    "max_steps": 400,
    "batch_size": 8,
    "holdout_fraction": 0.25,
    "augmentations": ["hflip"],
    "checkpoint_every_steps": 6,  # resnet18 + Adam: 134 MB a save
}
_VELOCITY = {
    "net": {
        "type": "UNet",
        "model_channels": 8,
        "ch_mult": [1, 2],
        "normalization": "GroupNormAuto",
        "activation": "SiLU",
        "num_res_blocks": 1,
        "attention_resolutions": [],
        "num_attention_heads": 2,
        "zero_out": True,
    },
    "train_images": 8 * 30,
    "train_batch_size": 8,
    "train_minibatch_size": 4,
    "learning_rate": 1e-3,
    "sample_batch_size": 2,
    "sample_every_images": 10**6,
    "num_inference_steps": 2,
    "checkpoint_every_steps": 2,
}


def campaign_config(folder: Path) -> Path:
    """The campaign's config file, written into `folder`."""
    cfg = {
        "type": "RFPix2pixModel",
        "max_size": 32,
        "store_max_side": 32,
        "seed": 0,
        "codec": _CODEC,
        "saliency": _SALIENCY,
        "velocity": _VELOCITY,
    }
    path = folder / "faults.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _env(home: Path, root: Path) -> dict:
    import rfp_core

    code = str(Path(rfp_core.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "RFP_HOME": str(home),
        "DAGSTER_HOME": str(root / "dagster_home"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": code + (os.pathsep + path if path else ""),
        "HF_HUB_OFFLINE": "1",
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _rfp_channel(run_id: str, cfg: Path, data, home: Path, root: Path) -> Channel:
    run = home / "runs" / run_id
    cmd = [
        sys.executable,
        "-m",
        "rfp_core.cli",
        "train",
        "-c",
        str(cfg),
        "-d0",
        str(data.domain0),
        "-d1",
        str(data.domain1),
        "--run-id",
        run_id,
        "--dev",
        "--device",
        "cpu",
    ]
    return Channel(f"rfp train {run_id}", cmd, _env(home, root), {p: run for p in PHASES}, log=root / f"{run_id}.log")


def _dagster_channel(name: str, cfg: Path, data, home: Path, root: Path) -> Channel:
    project = root / "project"
    exp = project / "experiments" / f"{name}.json"
    exp.parent.mkdir(parents=True, exist_ok=True)
    exp.write_text(json.dumps({"domain0": [str(data.domain0)], "domain1": [str(data.domain1)], "config": str(cfg)}))
    (root / "dagster_home").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "rfp_pipeline.fault_worker", "--experiment", name, "--project", str(project)]
    stages = home / "pipeline" / name
    return Channel(
        f"dagster {name}",
        cmd,
        _env(home, root),
        {p: stages / p for p in PHASES},
        stage_keys=True,
        log=root / f"dagster-{name}.log",
    )


def _campaign(
    channel_of, targets: list[str], reference: dict, estimate: dict, rng: random.Random, tally: Tally, max_runs: int = 3
) -> list[str]:
    """Faulted runs (fresh folders) until every target kill happened; the mismatches of each run."""
    bad: list[str] = []
    for n in range(max_runs):
        ch = channel_of(n)
        targets = drive(ch, targets, estimate, rng, tally)
        bad += [f"{ch.name}: {m}" for m in mismatches(reference, weights(ch))]
        if not targets:
            break
    return bad


def _create_mlflow_store(home: Path) -> None:
    """Create MLflow's sqlite store before any kill: MLflow builds its schema in many steps, and a
    kill among them leaves a store every later run fails on ("table ... already exists"), which
    a campaign run hit. That is MLflow's limit, not resume's: the store is made first."""
    import mlflow

    mlflow.MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").search_experiments()


@dataclass(frozen=True)
class Campaign:
    """Where a campaign runs and what it trains: the config file, the demo data, the RNG of its kills."""

    root: Path
    home: Path
    cfg: Path
    data: Any
    rng: random.Random


def _faulted(c: Campaign, targets: tuple[list[str], list[str]], reference: dict, estimate: dict, tally: Tally):
    """The faulted runs through `rfp train`, then through Dagster; (mismatches, kills through rfp train)."""
    cfg, data, home, root, rng = c.cfg, c.data, c.home, c.root, c.rng
    rfp_targets, dagster_targets = targets
    bad = _campaign(
        lambda n: _rfp_channel(f"faulted-{n}", cfg, data, home, root), rfp_targets, reference, estimate, rng, tally
    )
    rfp_kills = len(tally.kills)
    print(f"faults: rfp train: {rfp_kills} kills in {tally.kills}", file=sys.stderr)
    if dagster_targets:
        _create_mlflow_store(home)
        bad += _campaign(
            lambda n: _dagster_channel(f"faults{n}", cfg, data, home, root),
            dagster_targets,
            reference,
            estimate,
            rng,
            tally,
        )
    print(f"faults: dagster: {len(tally.kills) - rfp_kills} kills in {tally.kills[rfp_kills:]}", file=sys.stderr)
    return bad, rfp_kills


def run(
    quick: bool = False,
    device: str | None = None,
    seed: int = 0,
    root: Path | None = None,
    rfp_targets: list[str] | None = None,
    dagster_targets: list[str] | None = None,
) -> dict:
    """The campaign; `quick`: one kill per phase through `rfp train` and one through Dagster."""
    from rfp_core.media.demo_data import make_demo_data

    if device not in (None, "cpu"):
        raise ValueError(
            "rfp bench faults compares weights bit for bit, which resume guarantees on CPU only: use --device cpu"
        )
    start, load = time.perf_counter(), os.getloadavg()[0]
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rfp-faults-"))
    data = make_demo_data(root / "data", num=12, size=32, video_frames=4)
    c = Campaign(root, root / "home", campaign_config(root), data, random.Random(seed))
    rfp_targets = rfp_targets if rfp_targets is not None else (list(PHASES) if quick else RFP_TARGETS)
    dagster_targets = dagster_targets if dagster_targets is not None else (["saliency"] if quick else DAGSTER_TARGETS)

    ref_ch, ref_tally = _rfp_channel("reference", c.cfg, c.data, c.home, root), Tally()
    drive(ref_ch, [], {}, c.rng, ref_tally)
    reference, estimate = weights(ref_ch), ref_tally.phase_seconds
    print(f"faults: reference run done, phase seconds {estimate}", file=sys.stderr)

    tally = Tally()
    bad, rfp_kills = _faulted(c, (rfp_targets, dagster_targets), reference, estimate, tally)
    orphans, corrupt = audit(c.home)
    for line in bad + orphans + corrupt:
        print(f"faults: {line}", file=sys.stderr)
    return {
        "bench": "faults",
        "kills": len(tally.kills),
        "kills_rfp_train": rfp_kills,
        "kills_dagster": len(tally.kills) - rfp_kills,
        "kills_by_phase": {p: tally.kills.count(p) for p in PHASES},
        "resumes": tally.resumes,
        "launches": tally.launches,
        "mismatches": len(bad),
        "orphaned_files": len(orphans),
        "corrupt_files": len(corrupt),
        "reference_phase_seconds": {k: round(v, 2) for k, v in estimate.items()},
        "wall_s": round(time.perf_counter() - start, 1),
        "seed": seed,
        "quick": quick,
        "device": "cpu",
        "cpus": os.cpu_count(),
        "load_avg_1min_at_start": round(load, 2),
        "root": str(root),
    }
