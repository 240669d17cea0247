"""Phase 2: the velocity UNet, trained with the saliency-weighted loss (plain MSE in generative mode).

Resume is exact: the data order is a function of the step (`StepSampler`), the LR a function of
the step (`lr_at`), and a checkpoint holds model, EMA, optimizer, step and the RNG states. It only
continues checkpoints of the same lineage (what the run is built from; `train/resume.py`).
"""

from __future__ import annotations

import contextlib
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

from rfp_core import flow
from rfp_core.atomic import sweep_temps
from rfp_core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from rfp_core.config import ModelConfig, config_from_dict
from rfp_core.data import FrameDataset, UnpairedDataset
from rfp_core.frame_store import FrameStore
from rfp_core.images import save_grid
from rfp_core.nets import build_velocity_net
from rfp_core.tracking import LogFn
from rfp_core.train import distributed, speed
from rfp_core.train.anchor import RelativeAnchor
from rfp_core.train.codec_io import load_codec
from rfp_core.train.coupling import Coupler
from rfp_core.train.ema import EMA, horizon_note
from rfp_core.train.resume import (
    budget_note,
    lineage_record,
    make_room,
    resume_point,
    rng_state,
    set_rng_state,
    trim_metrics,
    velocity_inputs,
)
from rfp_core.train.saliency import load_saliency
from rfp_core.train.schedule import lr_at

CKPT_PREFIX = "velocity"  # intermediate checkpoints: velocity_{step:08d}.pt
SALT_T, SALT_NOISE = 1, 2  # per-sample draws (train/distributed.py): timestep, generative noise


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


def _sample_inputs(cfg: ModelConfig, manifest: Path, store, n: int) -> torch.Tensor | None:
    """A fixed set of domain-0 frames (held-out first) for the periodic sample grids."""
    for split in ("holdout", "all"):
        try:
            ds = FrameDataset(
                manifest,
                store,
                0,
                cfg.max_size,
                split=split,
                holdout_fraction=cfg.saliency.holdout_fraction,
                train_crop=False,
            )
        except ValueError:  # no frames in this split
            continue
        # evenly spaced: consecutive frames of one video would fill the grid with one scene
        idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique().tolist()
        return torch.stack([ds[i] for i in idx])
    return None


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
    vc = cfg.velocity
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world, device = distributed.init(device)  # one process, or this rank of torchrun's world
    sweep_temps(out_dir)  # temp files of a call killed mid-write
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    cfg_json = json.loads(cfg.to_json())
    total, mb = vc.total_steps, vc.train_minibatch_size
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
    if (note := horizon_note(vc.ema, total)) is not None:
        print(note, file=sys.stderr)
    h = None
    if use_saliency:
        saliency = load_saliency(saliency_checkpoint, device)
        # the BN-folded copy with a batched primal+tangent jvp is the fast path of the loss
        h = saliency.frozen_h() if hasattr(saliency, "frozen_h") else saliency.h
    # the anchor's weight: a number, or a share of the saliency term (train/anchor.py)
    anchor = RelativeAnchor(vc.mse_weight) if vc.mse_weight_mode == "relative" and vc.mse_weight > 0 else None
    mse_weight = anchor if anchor is not None else vc.mse_weight
    couple = Coupler(cfg, device) if vc.coupling == "minibatch_ot" else None

    # --- resume: an explicit checkpoint, else the newest loadable one of this lineage here
    inputs = velocity_inputs(cfg_json, manifest, saliency_checkpoint if use_saliency else None, codec_checkpoint, pairs)
    lineage = lineage_record(inputs)
    step, resume_state, source = 0, None, None
    start = 0  # the step this call's budget counts from (an original checkpoint's step, else 0)
    if resume_from is not None and Path(resume_from).suffix == ".ckpt":
        # the original trainer's velocity_<run>_<step>.ckpt: its weights, its step, a fresh budget after it
        from rfp_core.original import checkpoint_step, load_into

        load_into(model, resume_from)
        ema = EMA(model, vc.ema, vc.ema_warmup_steps)
        step = start = checkpoint_step(resume_from) or 0
        total = start + total
        print(f"velocity: continuing from {resume_from} at step {start}; training to step {total}", file=sys.stderr)
    else:
        found = None

        def pick() -> str | None:  # rank 0 picks (it may move other work aside); the others load that file
            nonlocal found
            found = resume_point(out_dir, CKPT_PREFIX, inputs, resume_from=resume_from, force=force)
            return None if found is None else str(found[0])

        picked = world.from_main(pick)
        if picked is not None:
            source, resume_state = found or (Path(picked), load_checkpoint(Path(picked), map_location="cpu"))
    if resume_state is not None:
        try:
            if "optimizer" in resume_state:  # a full intermediate checkpoint: continue exactly
                model.load_state_dict(resume_state["model"])
                ema.load_state_dict(resume_state["ema"])
                opt.load_state_dict(resume_state["optimizer"])
                if anchor is not None and "anchor" in resume_state:
                    anchor.load_state_dict(resume_state["anchor"])
                step = int(resume_state["step"])
                set_rng_state(resume_state["rng"], device)
                print(f"velocity: resuming from {source} at step {step}/{total}", file=sys.stderr)
                if (note := budget_note(resume_state, total, vc.train_batch_size)) is not None:
                    print(note, file=sys.stderr)
            else:  # a final (EMA-only) checkpoint: initialise the weights, train from step 0
                model.load_state_dict(resume_state["velocity"])
                ema = EMA(model, vc.ema, vc.ema_warmup_steps)
                print(f"velocity: initialised from the weights of {source}; training from step 0", file=sys.stderr)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"{source} does not fit this velocity net / config ({type(exc).__name__}: {str(exc)[:200]}); "
                "resume with the config it was trained with, or start without --checkpoint"
            ) from None

    ddp = speed.compiled(world.wrap(model, device), vc)  # forward and backward through this; `model` holds the weights
    metrics_path = out_dir / "metrics.jsonl"
    if world.main:
        trim_metrics(metrics_path, step)
    samples_dir = out_dir / "samples"
    sample_x = None if cfg.generative or not world.main else _sample_inputs(cfg, manifest, store, vc.sample_batch_size)
    sample_noise = None
    sample_grid: Path | None = None

    dataset = UnpairedDataset(
        manifest,
        store,
        cfg.max_size,
        generative=cfg.generative,
        split="train",
        holdout_fraction=cfg.saliency.holdout_fraction,
        pairs=pairs,
    )
    # Step-indexed order (StepSampler's), this rank's shard of each step's batch in micro-batches;
    # each sample's crop is seeded by its position, so resume is exact in loader workers too.
    workers = min(4, (os.cpu_count() or 1) // 2) if device.type == "cuda" else 0
    shards = distributed.ShardBatches(vc.train_batch_size, mb, world, start_step=step)
    micro_sizes = shards.micro_sizes()
    loader = DataLoader(
        distributed.Positions(dataset, cfg.seed),
        batch_sampler=shards,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    batches = iter(loader)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if vc.bf16 and device.type == "cuda" else contextlib.nullcontext()
    )

    def save_state(at: int) -> Path:
        path = out_dir / f"{CKPT_PREFIX}_{at:08d}.pt"
        make_room(path, lineage["lineage"])
        save_checkpoint(
            path,
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "step": at,
                "rng": rng_state(device),
                "config": cfg_json,
                "in_channels": codec.latent_channels,
                "codec": codec.state_dict(),  # so `rfp translate --run velocity_N.pt` works in latent space too
                "total_steps": total,
                **lineage,
                **({"anchor": anchor.state_dict()} if anchor is not None else {}),
            },
        )
        prune_checkpoints(out_dir, CKPT_PREFIX, keep=2, lineage=lineage["lineage"])  # never another run's files
        return path

    def write_samples(at: int) -> Path:
        nonlocal sample_noise
        net = ema.model
        with torch.no_grad():
            if cfg.generative:
                if sample_noise is None:
                    g = torch.Generator().manual_seed(cfg.seed)
                    side = cfg.max_size // codec.downsample
                    sample_noise = codec.sample_random_latent(
                        (vc.sample_batch_size, codec.latent_channels, side, side), generator=g
                    )
                z = flow.integrate(net, sample_noise.to(device), vc.num_inference_steps, sampler=vc.sampler)
                rows = [codec.decode(z)]
            else:
                z = flow.integrate(net, codec.encode(sample_x.to(device)), vc.num_inference_steps, sampler=vc.sampler)
                rows = [sample_x, codec.decode(z)]
        return save_grid(rows, samples_dir / f"step_{at:08d}.png")

    model.train()
    bar = tqdm(total=total, initial=step, desc="velocity", disable=not progress or not world.main, dynamic_ncols=True)
    log_every = max(1, min(50, total // 20))
    images_per_step = vc.train_batch_size
    sample_every = max(1, math.ceil(vc.sample_every_images / images_per_step))
    last_ckpt_time = time.monotonic()
    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
    window_terms = torch.zeros(2)
    run_start, run_start_step = time.perf_counter(), step
    final_loss = float("nan")
    while step < total:
        lr = lr_at(step - start, total - start, vc.learning_rate, vc.lr_schedule, vc.warmup_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        step_terms = torch.zeros(2, device=device)  # (saliency term, plain MSE) of the step, for the log
        distributed.seed_step(cfg.seed, step, world)
        for i, n in enumerate(micro_sizes):
            batch = next(batches)
            pos = batch["position"]  # per-sample draws by position: the same at any world size
            with torch.no_grad():
                x1 = codec.encode(batch["domain_1"].to(device, non_blocking=True))
                x0 = (
                    distributed.per_sample(
                        lambda g, shape=(1, *x1.shape[1:]): codec.sample_random_latent(shape, generator=g),
                        cfg.seed,
                        pos,
                        SALT_NOISE,
                    ).to(device)
                    if cfg.generative
                    else codec.encode(batch["domain_0"].to(device, non_blocking=True))
                )
                if couple is not None:  # minibatch OT: re-pair the drawn x1 with the drawn x0 (within a rank's shard)
                    x1 = couple(batch, x0, x1)
            t = distributed.per_sample(
                lambda g: flow.sample_timesteps(1, vc.timestep_sampling, generator=g), cfg.seed, pos, SALT_T
            ).to(device)
            x_t = flow.interpolate(x0, x1, t)
            target = x1 - x0
            share = n / vc.train_batch_size  # of the global batch: DDP's mean over ranks is the batch mean
            with distributed.no_sync(ddp, last=i == len(micro_sizes) - 1):  # the saliency jvp stays per rank
                with autocast:
                    v = ddp(x_t, t)
                v = v.float()
                if use_saliency:
                    loss, term_sal, term_mse = flow.anchored_saliency_loss_terms(h, x_t, target, v, mse_weight)
                    step_terms += torch.stack([term_sal, term_mse]) * share
                else:
                    loss = flow.velocity_mse_loss(v, target)
                (loss * share * world.size).backward()
            step_loss += loss.detach() * share
        summed = world.sum_(torch.cat([step_loss.view(1), step_terms]))  # the global batch's loss, on every rank
        step_loss, step_terms = summed[0], summed[1:]
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            bar.close()
            last = latest_checkpoint(out_dir, CKPT_PREFIX, lineage=lineage["lineage"])
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise NonFiniteLoss(
                f"velocity loss became {loss_value} at step {step + 1}/{total}; training stopped and {kept}. "
                f"Lower velocity.learning_rate ({vc.learning_rate}), keep velocity.gradient_clip set "
                f"({vc.gradient_clip}), or turn velocity.bf16 off.",
                step=step + 1,
                last_checkpoint=last,
            )
        if vc.gradient_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), vc.gradient_clip)
        opt.step()
        ema.update(model)
        step += 1
        final_loss = loss_value
        window_loss += loss_value
        window_terms += step_terms.detach().cpu()
        window_steps += 1
        bar.update(1)

        if step % log_every == 0 or step == total:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "step": step,
                "loss": window_loss / window_steps,
                "lr": lr,
                "images_per_s": window_steps * images_per_step / max(elapsed, 1e-9),
                "images": step * images_per_step,
            }
            if use_saliency:  # the anchored loss's two terms apart: loss = loss_saliency + mse_weight * loss_mse
                metrics["loss_saliency"], metrics["loss_mse"] = (window_terms / window_steps).tolist()
                if anchor is not None:  # the MSE weight the relative anchor used last
                    metrics["mse_weight_effective"] = anchor.effective
            if world.main:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
            if log and world.main:
                logged = {
                    "velocity/loss": metrics["loss"],
                    "velocity/lr": lr,
                    "velocity/images_per_s": metrics["images_per_s"],
                }
                if use_saliency:
                    logged.update(
                        {"velocity/loss_saliency": metrics["loss_saliency"], "velocity/loss_mse": metrics["loss_mse"]}
                    )
                    if anchor is not None:
                        logged["velocity/mse_weight_effective"] = metrics["mse_weight_effective"]
                log(logged, step)
            window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
            window_terms = torch.zeros(2)
        if step % sample_every == 0 and step < total and world.main:
            sample_grid = write_samples(step)
        due_time = time.monotonic() - last_ckpt_time >= vc.checkpoint_every_minutes * 60
        due_steps = vc.checkpoint_every_steps is not None and step % vc.checkpoint_every_steps == 0
        if (due_time or due_steps) and step < total and world.main:
            save_state(step)
            last_ckpt_time = time.monotonic()
    bar.close()
    trained = step - run_start_step
    images_per_s = trained * images_per_step / max(time.perf_counter() - run_start, 1e-9) if trained else 0.0

    # the end: full state (so a larger budget can continue from here) and the EMA-only product
    final = out_dir / "velocity.pt"
    if world.main:
        save_state(step)
        sample_grid = write_samples(step)
        make_room(final, lineage["lineage"])
        save_checkpoint(
            final,
            {
                "velocity": ema.model.state_dict(),
                "config": cfg_json,
                "in_channels": codec.latent_channels,
                "step": step,
                "final_loss": final_loss,
                "codec": codec.state_dict(),
                "saliency_checkpoint": str(saliency_checkpoint) if use_saliency else None,
                **lineage,
            },
        )
    world.barrier()  # every rank returns once the product is on disk
    if math.isnan(final_loss):  # nothing trained in this call (resumed at the end): report the last logged loss
        final_loss = _last_logged_loss(metrics_path)
    return VelocityResult(final, final_loss, step, images_per_s, sample_grid, metrics_path)


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
