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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PHASES = ("codec", "saliency", "velocity")
RFP_TARGETS = ["codec", "codec", "saliency", "saliency", "velocity", "velocity"]
DAGSTER_TARGETS = ["codec", "saliency", "velocity", "velocity"]
WEIGHTS = {
    "codec": ("codec.pt", "codec"),
    "saliency": ("saliency.pt", "saliency"),
    "velocity": ("velocity.pt", "velocity"),
}
SALIENCY_THRESHOLD = 0.95
LAUNCH_TIMEOUT_S = 600
KILL_WINDOW = 0.4


def campaign_config(folder: Path) -> Path:
    """The tiny three-phase config: every phase some seconds on a busy CPU, checkpointing every few steps."""
    cfg = {
        "type": "RFPix2pixModel",
        "max_size": 32,
        "store_max_side": 32,
        "seed": 0,
        "codec": {
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
        },
        "saliency": {
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
            "checkpoint_every_steps": 6,
        },  # resnet18 + Adam: 134 MB a save
        "velocity": {
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
        },
    }
    path = folder / "faults.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


@dataclass
class Channel:
    """How one faulted run is launched and where its phases leave their files."""

    name: str
    command: list[str]
    env: dict
    phase_dirs: dict[str, Path]  # phase -> the folder (or the parent of the stage-key folders) it writes
    stage_keys: bool = False  # Dagster: the phase files sit in <dir>/<key>/
    log: Path | None = None

    def files(self, phase: str, name: str) -> list[Path]:
        d = self.phase_dirs[phase]
        return sorted(d.glob(f"*/{name}")) if self.stage_keys else [d / name]

    def phase(self) -> str:
        """The phase running now, judged from the files: start, codec, saliency, velocity or done."""
        started = (
            any(self.phase_dirs["codec"].glob("*/"))
            if self.stage_keys
            else (self.phase_dirs["codec"] / "config.json").exists()
        )
        if not started:
            return "start"
        if not any(_codec_finished(p) for p in self.files("codec", "codec.pt")):
            return "codec"
        if not any(_saliency_finished(p) for p in self.files("saliency", "saliency_state.json")):
            return "saliency"
        if not any(p.exists() for p in self.files("velocity", "velocity.pt")):
            return "velocity"
        return "done"


def _codec_finished(path: Path) -> bool:
    import torch

    try:
        return bool(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("finished"))
    except Exception:  # absent, or being replaced this instant
        return False


def _saliency_finished(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("stopped_by") is not None
    except (OSError, ValueError):
        return False


@dataclass
class Tally:
    kills: list[str] = field(default_factory=list)  # the phase each kill landed in
    launches: int = 0
    resumes: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)


def _launch(ch: Channel) -> subprocess.Popen:
    log = open(ch.log, "a") if ch.log else subprocess.DEVNULL
    return subprocess.Popen(ch.command, env=ch.env, stdout=log, stderr=log)


def drive(ch: Channel, targets: list[str], estimate: dict[str, float], rng: random.Random, tally: Tally) -> list[str]:
    """Launch `ch` until a launch finishes, killing it once per target phase; returns the targets
    left when the run finished first (they need another run)."""
    pending = list(targets)
    while True:
        proc = _launch(ch)
        tally.launches += 1
        started, seen = time.monotonic(), {}
        try:
            killed = False
            while proc.poll() is None:
                now_phase = ch.phase()
                seen.setdefault(now_phase, time.monotonic() - started)
                if pending and now_phase in PHASES and PHASES.index(now_phase) >= PHASES.index(pending[0]):
                    killed = _kill_at_random(proc, ch, now_phase, estimate, rng, tally)
                    if killed:
                        pending.pop(0)
                        break
                if time.monotonic() - started > LAUNCH_TIMEOUT_S:
                    raise RuntimeError(f"{ch.name}: a launch ran over {LAUNCH_TIMEOUT_S} s (log: {ch.log})")
                time.sleep(0.02)
        finally:
            if proc.poll() is None and not killed:
                proc.kill()
            proc.wait()
        if killed:
            tally.resumes += 1  # the next launch resumes it
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"{ch.name}: a launch failed with exit code {proc.returncode} (log: {ch.log})")
        if not tally.phase_seconds:
            order = [p for p in ("start", *PHASES, "done") if p in seen]
            tally.phase_seconds = {p: seen[order[i + 1]] - seen[p] for i, p in enumerate(order[:-1]) if p in PHASES}
        return pending


def _kill_at_random(
    proc, ch: Channel, phase: str, estimate: dict[str, float], rng: random.Random, tally: Tally
) -> bool:
    import signal

    # within the first 40% of the phase's reference duration: two kills in one phase (resumed from
    # its last checkpoint in between) both land before it ends
    deadline = time.monotonic() + rng.uniform(0.0, KILL_WINDOW * estimate.get(phase, 2.0))
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is not None:
        return False
    landed = ch.phase()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tally.kills.append(landed if landed in PHASES else phase)
    return True


def _weights(ch: Channel) -> dict:
    import torch

    out = {}
    for phase, (name, key) in WEIGHTS.items():
        (path,) = [p for p in ch.files(phase, name) if p.exists()][-1:] or [None]
        out[phase] = torch.load(path, map_location="cpu", weights_only=True)[key] if path else None
    return out


def mismatches(reference: dict, got: dict) -> list[str]:
    """One line per phase whose final weights are not the reference's bit for bit."""
    import torch

    bad = []
    for phase, ref in reference.items():
        other = got.get(phase)
        if ref is None or other is None or ref.keys() != other.keys():
            bad.append(f"{phase}: missing")
            continue
        differ = [k for k in ref if not torch.equal(ref[k], other[k])]
        if differ:
            bad.append(f"{phase}: {len(differ)} of {len(ref)} tensors differ (first: {differ[0]})")
    return bad


def audit(home: Path) -> tuple[list[str], list[str]]:
    """(orphaned temp files, unreadable files) under our parts of $RFP_HOME (MLflow's own store excluded)."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    orphans, corrupt = [], []
    for part in ("runs", "pipeline", "store", "cache", "manifests", "reflow"):
        for path in sorted((home / part).rglob("*")) if (home / part).is_dir() else []:
            if not path.is_file():
                continue
            try:
                if path.name.endswith(".tmp"):
                    orphans.append(str(path))
                elif path.suffix == ".pt":
                    torch.load(path, map_location="cpu", weights_only=True)
                elif path.suffix == ".parquet":
                    pq.read_table(path)
                elif path.suffix == ".json":
                    json.loads(path.read_text())
                elif path.suffix == ".jsonl":
                    [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                elif path.suffix in (".png", ".ppm"):  # frames and the store's smaller copies
                    with Image.open(path) as img:
                        img.load()
            except Exception as exc:  # anything that does not read back is what this audit is for
                corrupt.append(f"{path}: {type(exc).__name__}: {str(exc)[:100]}")
    return orphans, corrupt


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
        bad += [f"{ch.name}: {m}" for m in mismatches(reference, _weights(ch))]
        if not targets:
            break
    return bad


def _create_mlflow_store(home: Path) -> None:
    """Create MLflow's sqlite store before any kill: MLflow builds its schema in many steps, and a
    kill among them leaves a store every later run fails on ("table ... already exists"), which
    a campaign run hit. That is MLflow's limit, not resume's: the store is made first."""
    import mlflow

    mlflow.MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").search_experiments()


def run(
    quick: bool = False,
    device: str | None = None,
    seed: int = 0,
    root: Path | None = None,
    rfp_targets: list[str] | None = None,
    dagster_targets: list[str] | None = None,
) -> dict:
    """The campaign; `quick`: one kill per phase through `rfp train` and one through Dagster."""
    from rfp_core.demo_data import make_demo_data

    if device not in (None, "cpu"):
        raise ValueError(
            "rfp bench faults compares weights bit for bit, which resume guarantees on CPU only: use --device cpu"
        )
    start, load = time.perf_counter(), os.getloadavg()[0]
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rfp-faults-"))
    home = root / "home"
    rng = random.Random(seed)
    data = make_demo_data(root / "data", num=12, size=32, video_frames=4)
    cfg = campaign_config(root)
    rfp_targets = rfp_targets if rfp_targets is not None else (list(PHASES) if quick else RFP_TARGETS)
    dagster_targets = dagster_targets if dagster_targets is not None else (["saliency"] if quick else DAGSTER_TARGETS)

    ref_ch, ref_tally = _rfp_channel("reference", cfg, data, home, root), Tally()
    drive(ref_ch, [], {}, rng, ref_tally)
    reference, estimate = _weights(ref_ch), ref_tally.phase_seconds
    print(f"faults: reference run done, phase seconds {estimate}", file=sys.stderr)

    tally = Tally()
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
    orphans, corrupt = audit(home)
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
