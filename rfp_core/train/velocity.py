"""Phase 2: the velocity UNet, trained with the saliency-weighted loss (plain MSE in generative mode).

Resume is exact: the data order is a function of the step (`StepSampler`), the LR a function of
the step (`lr_at`), and a checkpoint holds model, EMA, optimizer, step and the RNG states. It only
continues checkpoints of the same lineage (what the run is built from; `train/resume.py`).
One step is `train/velocity_step.py`; the sample grids are `train/velocity_samples.py`.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rfp_core.atomic import sweep_temps
from rfp_core.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from rfp_core.config import ModelConfig
from rfp_core.config_files import config_from_dict
from rfp_core.flow.coupling import Coupler
from rfp_core.media.datasets import UnpairedDataset
from rfp_core.media.frame_store import FrameStore
from rfp_core.nets import build_velocity_net
from rfp_core.tracking import LogFn
from rfp_core.train import distributed, speed
from rfp_core.train.anchor import RelativeAnchor
from rfp_core.train.codec_io import load_codec
from rfp_core.train.ema import EMA, horizon_note
from rfp_core.train.resume import (
    budget_note,
    lineage_record,
    make_room,
    pick_resume_point,
    restore_exact,
    rng_state,
    trim_metrics,
    velocity_inputs,
    write_step_checkpoint,
)
from rfp_core.train.saliency import load_saliency_h
from rfp_core.train.schedule import CheckpointClock, lr_at, set_lr
from rfp_core.train.velocity_samples import SampleGrids, sample_inputs
from rfp_core.train.velocity_step import LossWindow, VelocityRun, accumulate_gradients, apply_step

CKPT_PREFIX = "velocity"  # intermediate checkpoints: velocity_{step:08d}.pt


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stopped, the last good checkpoint is untouched."""

    def __init__(self, message: str, step: int | None = None, last_checkpoint: Path | None = None):
        super().__init__(message)
        self.step, self.last_checkpoint = step, last_checkpoint


@dataclass
class VelocityResult:
    checkpoint: Path
    final_loss: float
    steps: int
    images_per_s: float
    sample_grid: Path | None
    metrics_path: Path


def train_velocity(
    cfg: ModelConfig,
    manifest: Path,
    out_dir: Path,
    device: str | torch.device = "cpu",
    saliency_checkpoint: Path | None = None,
    store=None,
    log: LogFn | None = None,
    resume_from: Path | None = None,
    pairs=None,
    codec_checkpoint: Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> VelocityResult:
    """Train v(x, t) for `cfg.velocity.total_steps` optimizer steps; returns the EMA checkpoint.

    `force`: velocity work of another lineage in `out_dir` is moved to `superseded/` and training
    starts afresh, instead of refusing (ResumeRefused)."""
    out_dir = Path(out_dir)
    run = _set_up(cfg, out_dir, device, saliency_checkpoint, codec_checkpoint)
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    sal_ckpt = saliency_checkpoint if run.use_saliency else None
    inputs = velocity_inputs(json.loads(cfg.to_json()), manifest, sal_ckpt, codec_checkpoint, pairs)
    run.lineage = lineage_record(inputs)
    _resume(run, inputs, resume_from, force)
    run.ddp = speed.compiled(
        run.world.wrap(run.model, run.device), run.cfg.velocity
    )  # forward and backward through this
    metrics_path = out_dir / "metrics.jsonl"
    if run.world.main:
        trim_metrics(metrics_path, run.step)
    shown = None
    if run.world.main and not cfg.generative:  # fixed inputs for the sample grids (rank 0 writes them)
        shown = sample_inputs(cfg, manifest, store, cfg.velocity.sample_batch_size)
    samples = SampleGrids(cfg, run.codec, run.device, out_dir, shown)
    _data(run, manifest, store, pairs)
    final_loss, images_per_s, sample_grid = _train(run, samples, metrics_path, log, progress)
    # the translation's retry asks the saliency net too, so the product names it whenever there is one
    retry = _retry_record(run, manifest, store, saliency_checkpoint)
    final, sample_grid = _finish(
        run, samples, final_loss, {"saliency_checkpoint": saliency_checkpoint, **retry}, sample_grid
    )
    if math.isnan(final_loss):  # nothing trained in this call (resumed at the end): report the last logged loss
        final_loss = _last_logged_loss(metrics_path)
    return VelocityResult(final, final_loss, run.step, images_per_s, sample_grid, metrics_path)


def _train(
    run: VelocityRun, samples: SampleGrids, metrics_path: Path, log: LogFn | None, progress: bool
) -> tuple[float, float, Path | None]:
    """The loop: steps to `run.total`, logging, sample grids and resume checkpoints on the way.
    Returns the last step's loss (NaN: no step trained), images/s and the newest grid."""
    vc, main = run.cfg.velocity, run.world.main
    run.model.train()
    bar = tqdm(total=run.total, initial=run.step, desc="velocity", disable=not progress or not main, dynamic_ncols=True)
    log_every = max(1, min(50, run.total // 20))
    sample_every = max(1, math.ceil(vc.sample_every_images / vc.train_batch_size))
    clock = CheckpointClock(vc.checkpoint_every_steps, vc.checkpoint_every_minutes * 60)
    window, final_loss, sample_grid = LossWindow(), float("nan"), None
    run_start, run_start_step = time.perf_counter(), run.step
    while run.step < run.total:
        lr = lr_at(run.step - run.start, run.total - run.start, vc.learning_rate, vc.lr_schedule, vc.warmup_fraction)
        set_lr(run.opt, lr)
        step_loss, step_terms = accumulate_gradients(run)
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            bar.close()
            raise _non_finite(run, loss_value)
        apply_step(run)
        final_loss = loss_value
        window.add(loss_value, step_terms)
        bar.update(1)
        if run.step % log_every == 0 or run.step == run.total:
            _log(run, window.metrics(run, lr), metrics_path, bar, log)
            window.reset()
        if run.step % sample_every == 0 and run.step < run.total and main:
            sample_grid = samples.write(run.ema.model, run.step)
        if clock.due(run.step) and run.step < run.total and main:
            _save_state(run)
            clock.reset()
    bar.close()
    trained = run.step - run_start_step
    elapsed = max(time.perf_counter() - run_start, 1e-9)
    return final_loss, trained * vc.train_batch_size / elapsed if trained else 0.0, sample_grid


def _set_up(
    cfg: ModelConfig, out_dir: Path, device, saliency_checkpoint: Path | None, codec_checkpoint: Path | None
) -> VelocityRun:
    """The world, the codec, the velocity net with its EMA and optimizer, the loss's saliency net."""
    vc = cfg.velocity
    out_dir.mkdir(parents=True, exist_ok=True)
    world, device = distributed.init(device)  # one process, or this rank of torchrun's world
    sweep_temps(out_dir)  # temp files of a call killed mid-write
    use_saliency = not cfg.generative and vc.loss == "saliency"
    if use_saliency and saliency_checkpoint is None:
        raise ValueError(
            "velocity.loss is 'saliency' but no saliency checkpoint was given: train phase 1 first "
            "(train_saliency) and pass saliency_checkpoint, or set velocity.loss to 'mse'"
        )
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    codec = load_codec(cfg, codec_checkpoint, device)
    speed.set_threads(vc, device)
    model = speed.prepare_net(build_velocity_net(vc.net, in_channels=codec.latent_channels).to(device), vc)
    ema = EMA(model, vc.ema, vc.ema_warmup_steps)
    opt = speed.make_optimizer(model, vc)
    if (note := horizon_note(vc.ema, vc.total_steps)) is not None:
        print(note, file=sys.stderr)
    h = load_saliency_h(saliency_checkpoint, device) if use_saliency else None
    anchor = RelativeAnchor(vc.mse_weight) if vc.mse_weight_mode == "relative" and vc.mse_weight > 0 else None
    couple = Coupler(cfg, device) if vc.coupling == "minibatch_ot" else None
    return VelocityRun(
        cfg, out_dir, world, device, codec, model, ema, opt, use_saliency, h, anchor, couple, total=vc.total_steps
    )


def _resume(run: VelocityRun, inputs: dict, resume_from: Path | None, force: bool) -> None:
    """Where this call starts: an original trainer's checkpoint, an explicit one, else the newest
    loadable one of this lineage in the run folder, else step 0."""
    vc = run.cfg.velocity
    if resume_from is not None and Path(resume_from).suffix == ".ckpt":
        # the original trainer's velocity_<run>_<step>.ckpt: its weights, its step, a fresh budget after it
        from rfp_core.original import checkpoint_step, load_into

        load_into(run.model, resume_from)
        run.ema = EMA(run.model, vc.ema, vc.ema_warmup_steps)
        run.step = run.start = checkpoint_step(resume_from) or 0
        run.total = run.start + run.total
        print(
            f"velocity: continuing from {resume_from} at step {run.start}; training to step {run.total}",
            file=sys.stderr,
        )
        return
    found = pick_resume_point(run.world, run.out_dir, CKPT_PREFIX, inputs, resume_from, force)
    if found is not None:
        _restore(run, *found)


def _restore(run: VelocityRun, source: Path, state: dict) -> None:
    vc = run.cfg.velocity
    try:
        if "optimizer" in state:  # a full intermediate checkpoint: continue exactly
            anchor = {"anchor": run.anchor} if run.anchor is not None and "anchor" in state else {}
            restore_exact(state, run.device, model=run.model, ema=run.ema, optimizer=run.opt, **anchor)
            run.step = int(state["step"])
            print(f"velocity: resuming from {source} at step {run.step}/{run.total}", file=sys.stderr)
            if (note := budget_note(state, run.total, vc.train_batch_size)) is not None:
                print(note, file=sys.stderr)
        else:  # a final (EMA-only) checkpoint: initialise the weights, train from step 0
            run.model.load_state_dict(state["velocity"])
            run.ema = EMA(run.model, vc.ema, vc.ema_warmup_steps)
            print(f"velocity: initialised from the weights of {source}; training from step 0", file=sys.stderr)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{source} does not fit this velocity net / config ({type(exc).__name__}: {str(exc)[:200]}); "
            "resume with the config it was trained with, or start without --checkpoint"
        ) from None


def _data(run: VelocityRun, manifest: Path, store, pairs) -> None:
    """The batches from `run.step` (see `velocity_loader`) and the step's autocast."""
    vc, device = run.cfg.velocity, run.device
    loader, run.micro_sizes = velocity_loader(run.cfg, manifest, store, run.world, device, run.step, pairs)
    run.batches = iter(loader)
    run.autocast = speed.velocity_autocast(vc, device)
    if vc.bf16 is None and speed.uses_bf16(vc, device) and run.world.main:
        print(f"velocity: bf16 autocast ({device.type} has bf16 kernels; velocity.bf16 false trains in float32)")


def velocity_loader(
    cfg: ModelConfig, manifest: Path, store, world, device: torch.device, start_step: int = 0, pairs=None
) -> tuple[DataLoader, list[int]]:
    """The phase's DataLoader and the step's micro-batch sizes: the step-indexed data order from
    `start_step`, this rank's shard of each step's batch in micro-batches; each sample's crop is
    seeded by its position, so resume is exact in loader workers too. (`rfp bench run` times it alone.)"""
    vc = cfg.velocity
    dataset = UnpairedDataset(
        manifest,
        store,
        cfg.max_size,
        generative=cfg.generative,
        split="train",
        holdout_fraction=cfg.saliency.holdout_fraction,
        pairs=pairs,
    )
    workers = min(4, (os.cpu_count() or 1) // 2) if device.type == "cuda" else 0
    shards = distributed.ShardBatches(vc.train_batch_size, vc.train_minibatch_size, world, start_step=start_step)
    loader = DataLoader(
        distributed.Positions(dataset, cfg.seed),
        batch_sampler=shards,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    return loader, shards.micro_sizes()


def _log(run: VelocityRun, metrics: dict, metrics_path: Path, bar, log: LogFn | None) -> None:
    if run.world.main:
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
    if log and run.world.main:
        log({f"velocity/{k}": v for k, v in metrics.items() if k not in ("step", "images")}, run.step)


def _non_finite(run: VelocityRun, loss: float) -> NonFiniteLoss:
    vc = run.cfg.velocity
    last = latest_checkpoint(run.out_dir, CKPT_PREFIX, lineage=run.lineage["lineage"])
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return NonFiniteLoss(
        f"velocity loss became {loss} at step {run.step + 1}/{run.total}; training stopped and {kept}. "
        f"Lower velocity.learning_rate ({vc.learning_rate}), keep velocity.gradient_clip set "
        f"({vc.gradient_clip}), or turn velocity.bf16 off.",
        step=run.step + 1,
        last_checkpoint=last,
    )


def _save_state(run: VelocityRun) -> Path:
    """A resume checkpoint at `run.step`: everything an exact continuation needs."""
    state = {
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict(),
        "optimizer": run.opt.state_dict(),
        "step": run.step,
        "rng": rng_state(run.device),
        "config": json.loads(run.cfg.to_json()),
        "in_channels": run.codec.latent_channels,
        "codec": run.codec.state_dict(),  # so `rfp translate --run velocity_N.pt` works in latent space too
        "total_steps": run.total,
        **run.lineage,
        **({"anchor": run.anchor.state_dict()} if run.anchor is not None else {}),
    }
    return write_step_checkpoint(run.out_dir, CKPT_PREFIX, run.step, state, run.lineage["lineage"])


def _retry_record(run: VelocityRun, manifest: Path, store, saliency: Path | None) -> dict:
    """{"retry_bar": the domain classifier's confidence bar} where the config retries translations."""
    if not (run.world.main and run.cfg.velocity.translate_retry_noise and saliency is not None):
        return {}
    from rfp_core.train.retry_bar import retry_bar

    return {"retry_bar": retry_bar(run.cfg, manifest, store, run.codec, saliency, run.device)}


def _finish(
    run: VelocityRun, samples: SampleGrids, final_loss: float, records: dict, sample_grid
) -> tuple[Path, Path | None]:
    """The end: full state (so a larger budget can continue from here) and the EMA-only product
    (`records`: its saliency checkpoint and retry bar, see `_retry_record`)."""
    final = run.out_dir / "velocity.pt"
    if run.world.main:
        _save_state(run)
        sample_grid = samples.write(run.ema.model, run.step)
        make_room(final, run.lineage["lineage"])
        extra = {
            **records,
            "saliency_checkpoint": str(records["saliency_checkpoint"]) if records["saliency_checkpoint"] else None,
            "precision": "bf16" if speed.uses_bf16(run.cfg.velocity, run.device) else "float32",
            **run.lineage,
        }
        weights, config = run.ema.model.state_dict(), json.loads(run.cfg.to_json())
        product = velocity_product(
            weights, config, run.codec.latent_channels, run.codec.state_dict(), run.step, final_loss, **extra
        )
        save_checkpoint(final, product)
    run.world.barrier()  # every rank returns once the product is on disk
    return final, sample_grid


def velocity_product(
    weights: dict, config: dict, in_channels: int, codec: dict, step: int, loss: float, **extra
) -> dict:
    """A `velocity.pt` (phase 2's product format, which `load_velocity` and `Translator` read)."""
    return {
        "velocity": weights,
        "config": config,
        "in_channels": in_channels,
        "step": step,
        "final_loss": loss,
        "codec": codec,
        **extra,
    }


def _last_logged_loss(path: Path) -> float:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return float(json.loads(lines[-1])["loss"])
    except (OSError, IndexError, KeyError, ValueError):
        return float("nan")


def load_velocity(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The EMA net from `velocity.pt` (or an intermediate checkpoint) and the checkpoint dict."""
    ckpt = load_checkpoint(Path(path), map_location="cpu")
    cfg = config_from_dict(ckpt["config"], source=str(path))
    net = build_velocity_net(cfg.velocity.net, in_channels=int(ckpt["in_channels"]))
    weights = ckpt["velocity"] if "velocity" in ckpt else ckpt.get("ema", {}).get("model")
    if weights is None:
        raise CheckpointError(f"{path}: not a velocity checkpoint (no 'velocity' or 'ema' weights)")
    net.load_state_dict(weights)
    return net.to(device).eval().requires_grad_(False), ckpt
