"""`rfp bench run --config CONFIG`: one whole `rfp train` on generated data, timed phase by phase.

For comparing machines and versions: the demo data generator makes both domains (`--num` images a
domain is not an option here; the config's `max_size` sets the size), then `train_run` runs once
per phase, each call stopping after that phase (`only=`) so its wall time is that phase's; the
finished earlier phases are reused by the next call (the resume rules see the same inputs), so
what a later call adds is that phase alone plus a re-scan of the data (`ingest_s`, timed on its own
first). With `--quick` the config is cut to the `--smoke` budget.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rfp_core.bench import report

DATA_NUM = (96, 24)  # images a domain (full, quick)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _config_path(config: str | None) -> Path:
    from rfp_core.config import ConfigError

    if not config:
        raise ConfigError("rfp bench run needs --config CONFIG (a config file, e.g. configs/demo.json)")
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    return path


def _phases(cfg) -> list[str]:
    """The phases `rfp train` runs for this config, in order."""
    return (
        (["codec"] if cfg.codec.net.type != "Identity" else [])
        + (["saliency"] if not cfg.generative and cfg.velocity.loss == "saliency" else [])
        + ["velocity"]
    )


def run(quick: bool = False, device: str | None = None, config: str | None = None) -> dict:
    from rfp_core.config_files import load_config
    from rfp_core.device import pick_device
    from rfp_core.media.demo_data import make_demo_data
    from rfp_core.media.frame_store import FrameStore
    from rfp_core.media.ingest import ingest
    from rfp_core.paths import rfp_home, runs_dir
    from rfp_core.train.run import smoke_config, train_run

    path = _config_path(config)
    cfg = smoke_config(load_config(path)) if quick else load_config(path)
    dev = pick_device(device)
    work = rfp_home() / "bench" / "run"
    data = make_demo_data(work / "data", num=DATA_NUM[int(quick)], size=max(cfg.max_size, 32))
    d0 = "random" if cfg.generative else [data.domain0]
    run_id = f"bench-run-{path.stem}" + ("-quick" if quick else "")
    shutil.rmtree(runs_dir() / run_id, ignore_errors=True)  # timed from scratch, never resumed
    store = FrameStore(max_side=cfg.store_max_side)
    timings = {
        "ingest_s": _timed(
            lambda: ingest(d0, [data.domain1], out=work / "manifest.parquet", store=store, progress=False)
        )
    }
    phases = _phases(cfg)
    for phase in phases:
        only = None if phase == "velocity" else phase
        timings[f"{phase}_s"] = _timed(
            lambda only=only: train_run(
                cfg, d0, [data.domain1], run_id=run_id, device=dev, only=only, progress=not quick
            )
        )
    total = sum(timings.values())
    print(
        f"bench run {path}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f", total {total:.1f} s",
        file=sys.stderr,
    )
    return {
        "benchmark": "run",
        "config": str(path),
        "quick": quick,
        "device": str(dev),
        **timings,
        "total_s": total,
        "velocity_steps": cfg.velocity.total_steps,
        "max_size": cfg.max_size,
        "platform": report.platform_line(),
        "run_dir": str(runs_dir() / run_id),
        "date": report.today(),
        "phases": json.loads(json.dumps(phases)),
    }
