"""How `rfp bench faults` drives one faulted run: launch it, watch its files for the phase it is
in, SIGKILL it at a random moment in a target phase, relaunch (it resumes) until a launch finishes."""

from __future__ import annotations

import json
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PHASES = ("codec", "saliency", "velocity")
LAUNCH_TIMEOUT_S = 600
KILL_WINDOW = 0.4


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
