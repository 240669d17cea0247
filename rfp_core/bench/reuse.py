"""A benchmark's trained run, reused when a finished run of exactly its config is already there.

A run folder that finished records what it was made from in a marker file (`quality.json`,
`ablation.json`); a rerun with the same record re-scores that run instead of training again, and
anything else trains afresh in an emptied folder (never a resumed one: its timing would be wrong).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable


def comparable(cfg) -> dict:
    """A config as the marker records it: what training depends on (the data folders differ
    between machines, and the σ a translation starts from is applied when it is translated)."""
    return cfg.model_dump(mode="json", exclude={"domain0": True, "domain1": True, "velocity": {"translate_noise"}})


def _current(saved_config: dict | None) -> dict | None:
    """A recorded config as today's schema reads it: a key added since it was recorded takes its
    default (every new key's default is the behaviour from before it existed), so a run made before
    the key existed still counts as the same config."""
    from rfp_core.config import ConfigError
    from rfp_core.config_files import config_from_dict

    if saved_config is None:
        return None
    try:
        return comparable(config_from_dict(saved_config, source="a benchmark's marker"))
    except (ConfigError, ValueError):
        return saved_config


def finished(run_dir: Path, marker: str, expect: dict[str, Any]) -> float | None:
    """Training seconds of a finished run whose marker holds every `expect` item, else None."""
    try:
        saved = json.loads((run_dir / marker).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if "config" in expect:
        saved["config"] = _current(saved.get("config"))
    same = all(saved.get(k) == v for k, v in expect.items())
    return float(saved["train_seconds"]) if same and (run_dir / "velocity.pt").exists() else None


def train_once(
    run_dir: Path,
    marker: str,
    expect: dict[str, Any],
    train: Callable[[], object],
    note: str,
    retrain: bool = False,
    prepare: Callable[[], None] | None = None,
) -> tuple[float, bool]:
    """(training seconds, reused): the finished run's, or `train()`'s in an emptied `run_dir`.

    `prepare` runs after the folder is emptied and before the clock starts (shared phase files)."""
    from rfp_core.atomic import atomic_write_text

    done = finished(run_dir, marker, expect)
    if done is not None and not retrain:
        print(f"{run_dir.name}: trained with this config already, {note}", file=sys.stderr)
        return done, True
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed one
    if prepare is not None:
        prepare()
    t0 = time.perf_counter()
    train()
    seconds = time.perf_counter() - t0
    atomic_write_text(run_dir / marker, json.dumps({**expect, "train_seconds": seconds}))
    return seconds, False
