"""`rfp bench run --config CONFIG`: one whole `rfp train` on generated data, timed phase by phase.

For comparing machines and versions: the demo data generator makes both domains (`--num` images a
domain is not an option here; the config's `max_size` sets the size), then `train_run` runs once
per phase, each call stopping after that phase (`only=`) so its wall time is that phase's; the
finished earlier phases are reused by the next call (the resume rules see the same inputs), so
what a later call adds is that phase alone plus a re-scan of the data (`ingest_s`, timed on its own
first). With `--quick` the config is cut to the `--smoke` budget.

Beside them, from the finished run (`_speeds`): velocity training images/s against its DataLoader
alone (samples/s; a sample is one training image), the saliency steps and one held-out evaluation
timed (the phase does not time them; their share is estimated), translation images/s at 1 and 12 steps.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rfp_core.bench import report

DATA_NUM = (96, 24)  # images a domain (full, quick)
DATA_BATCHES = 40  # loader micro-batches timed for the data path, after one warm-up batch
TRANSLATE_BATCH = 16  # held-out domain-0 frames translated at once (repeated if there are fewer)
TRANSLATE_STEPS = (1, 12)
MIN_TIMED_S = 0.5  # a fast call is repeated until this long, so the rate is not one timer tick


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rate(fn, n: int, device) -> float:
    """n / seconds of one fn() call, after one warm-up call (mean over calls for MIN_TIMED_S);
    CUDA is synchronised after each call, so a call's queued kernels count in its time."""
    import torch

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < MIN_TIMED_S or not calls:
        call()
        calls += 1
    return calls * n / elapsed


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
        + (["saliency"] if cfg.needs_saliency else [])
        + ["velocity"]
    )


def run(quick: bool = False, device: str | None = None, config: str | None = None) -> dict:
    from rfp_core.config_files import load_config
    from rfp_core.device import pick_device
    from rfp_core.paths import runs_dir
    from rfp_core.train.run import smoke_config

    path = _config_path(config)
    cfg = smoke_config(load_config(path)) if quick else load_config(path)
    dev = pick_device(device)
    run_id = f"bench-run-{path.stem}" + ("-quick" if quick else "")
    run_dir = runs_dir() / run_id
    shutil.rmtree(run_dir, ignore_errors=True)  # timed from scratch, never resumed
    phases = _phases(cfg)
    timings, store = _train_timed(cfg, dev, quick, run_id, phases)
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
        **_speeds(cfg, run_dir, store, dev, timings.get("saliency_s")),
        "platform": report.platform_line(),
        "run_dir": str(run_dir),
        "date": report.today(),
        "phases": json.loads(json.dumps(phases)),
    }


def _train_timed(cfg, dev, quick: bool, run_id: str, phases: list[str]):
    """Demo data, then ingest and each phase timed on its own; returns the timings and the store."""
    from rfp_core.media.demo_data import make_demo_data
    from rfp_core.media.frame_store import FrameStore
    from rfp_core.media.ingest import ingest
    from rfp_core.paths import rfp_home
    from rfp_core.train.run import train_run

    work = rfp_home() / "bench" / "run"
    data = make_demo_data(work / "data", num=DATA_NUM[int(quick)], size=max(cfg.max_size, 32))
    d0 = "random" if cfg.generative else [data.domain0]
    store = FrameStore(max_side=cfg.store_max_side)
    timings = {
        "ingest_s": _timed(
            lambda: ingest(d0, [data.domain1], out=work / "manifest.parquet", store=store, progress=False)
        )
    }
    for phase in phases:
        only = None if phase == "velocity" else phase
        timings[f"{phase}_s"] = _timed(
            lambda only=only: train_run(
                cfg, d0, [data.domain1], run_id=run_id, device=dev, only=only, progress=not quick
            )
        )
    return timings, store


def _speeds(cfg, run_dir: Path, store, dev, saliency_s: float | None) -> dict:
    """Throughputs of the finished run: training against its data path, saliency, translation."""
    from rfp_core.inference.translate import Translator

    training = _training_rate(run_dir / "metrics.jsonl")
    data = _data_rate(cfg, run_dir, store, dev)
    translator = Translator.from_run(run_dir, dev)
    return {
        "velocity_images_per_s": training,
        "data_samples_per_s": data,
        "data_batches": DATA_BATCHES,
        "data_path_faster_than_training": data > training,
        **(_saliency(cfg, run_dir, store, translator, saliency_s) if saliency_s is not None else {}),
        **_translate_rates(cfg, run_dir, store, translator),
    }


def _training_rate(metrics: Path) -> float:
    """Images/s of the whole velocity phase from its metrics.jsonl windows: their images over the
    sum of their seconds (a window also holds the sample grids and checkpoints written in it)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    images = [b["images"] - a for a, b in zip([0] + [r["images"] for r in rows], rows)]
    return sum(images) / sum(n / r["images_per_s"] for n, r in zip(images, rows))


def _data_rate(cfg, run_dir: Path, store, dev) -> float:
    """Samples/s of the velocity phase's own DataLoader iterated without training."""
    from rfp_core.structure.pairing import read_pairs
    from rfp_core.train import distributed
    from rfp_core.train.velocity import velocity_loader

    pairs = read_pairs(run_dir / "pairs.parquet") if (run_dir / "pairs.parquet").is_file() else None
    loader, _ = velocity_loader(cfg, run_dir / "manifest.parquet", store, distributed.world(), dev, pairs=pairs)
    batches = iter(loader)
    next(batches)  # warm-up: loader workers start (on CUDA)
    samples, t0 = 0, time.perf_counter()
    for _ in range(DATA_BATCHES):
        samples += len(next(batches)["position"])
    return samples / (time.perf_counter() - t0)


def _saliency(cfg, run_dir: Path, store, translator, seconds: float) -> dict:
    """Steps of the saliency phase and one held-out evaluation (`evaluate_accuracy`) timed alone."""
    from rfp_core.train.saliency import load_saliency
    from rfp_core.train.saliency_stop import StopRule, evaluate_accuracy, holdout_batches

    sc, dev, codec = cfg.saliency, translator.device, translator.codec  # the codec the phase trained on
    steps = int(json.loads((run_dir / "saliency_state.json").read_text())["steps"])
    net = load_saliency(run_dir / "saliency.pt", dev)
    held_out = holdout_batches(run_dir / "manifest.parquet", store, cfg, StopRule(sc).eval_split)
    eval_s = 1 / _rate(lambda: evaluate_accuracy(net, codec, held_out, dev), 1, dev)
    evals = steps // sc.eval_every + int(steps >= sc.max_steps and steps % sc.eval_every != 0)  # as the loop
    return {
        "saliency_steps": steps,
        "saliency_eval_ms": eval_s * 1e3,
        "saliency_evals": evals,
        "saliency_eval_share": evals * eval_s / seconds,  # estimated: evaluations x one's time / phase seconds
    }


def _translate_rates(cfg, run_dir: Path, store, translator) -> dict:
    """Images/s of `Translator.translate` on a batch of held-out domain-0 frames (generative: of
    `generate`) at each of TRANSLATE_STEPS Euler steps."""
    from rfp_core.train.saliency_stop import holdout_batches

    n = TRANSLATE_BATCH
    if translator.generative:
        fns = {s: lambda s=s: translator.generate(n, steps=s, sampler="euler") for s in TRANSLATE_STEPS}
    else:
        frames = holdout_batches(run_dir / "manifest.parquet", store, cfg)[0][0]
        x = frames.repeat(-(-n // len(frames)), 1, 1, 1)[:n]
        fns = {s: lambda s=s: translator.translate(x, steps=s, sampler="euler") for s in TRANSLATE_STEPS}
    rates = {str(s): _rate(fn, n, translator.device) for s, fn in fns.items()}
    return {"translate_batch": n, "translate_sampler": "euler", "translate_images_per_s": rates}
