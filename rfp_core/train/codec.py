"""Phase 0: train the codec on frames of both domains with the losses `codec.losses` lists.

The loop is the original's: `train_images / train_batch_size` optimizer steps, each accumulated
over minibatches of `train_minibatch_size`, the codec's own `augmentations`, LR warm-up then
constant or cosine, gradient-norm clipping (0 = off). The weighted sum is minimised and every
loss is logged under its `id` (rfp_core/train/codec_losses.py). The phase checkpoints every
`checkpoint_every_minutes` (and every `checkpoint_every_steps`) and a rerun continues from there, exactly
on CPU: the checkpoint holds the optimizer and RNG state and the data order is a function of the step.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm.auto import tqdm

from rfp_core.atomic import sweep_temps
from rfp_core.config import ConfigError, ModelConfig
from rfp_core.media.datasets import FrameDataset
from rfp_core.media.frame_store import FrameStore
from rfp_core.nets.autoencoder import build_codec
from rfp_core.tracking import LogFn
from rfp_core.train.codec_losses import check_losses, codec_losses, structure_loss  # noqa: F401 (re-export)
from rfp_core.train.resume import StepSampler, rng_state, set_rng_state
from rfp_core.train.saliency import augment_batch, build_augment
from rfp_core.train.schedule import lr_at

MAX_EVAL_IMAGES = 256  # held-out images scored for recon_l1
LOG_EVERY = 25


@dataclass
class CodecResult:
    checkpoint: Path
    recon_l1: float  # held-out mean |decode(encode(x)) - x|, [-1, 1] units
    steps: int
    recon_l1_init: float = float("nan")  # the same before training


def _datasets(cfg: ModelConfig, manifest: Path, store, split: str) -> ConcatDataset:
    domains = [1] if cfg.generative else [0, 1]
    frac = cfg.saliency.holdout_fraction  # the frames the saliency phase also holds out
    return ConcatDataset(
        [FrameDataset(manifest, store, d, cfg.max_size, split, frac, train_crop=split == "train") for d in domains]
    )


def _evenly(ds, n: int):
    if len(ds) <= n:
        return ds
    return Subset(ds, [round(i * (len(ds) - 1) / (n - 1)) for i in range(n)])


@torch.no_grad()
def reconstruction_l1(codec: nn.Module, data, device, batch_size: int = 32) -> float:
    codec.eval()
    total, count = 0.0, 0
    for x in DataLoader(data, batch_size=batch_size):
        x = x.to(device)
        total += (codec.decode(codec.encode(x)) - x).abs().mean(dim=(1, 2, 3)).sum().item()
        count += len(x)
    return total / max(1, count)


def _same_setup(ckpt: dict, cfg: ModelConfig) -> bool:
    old = ckpt.get("config", {})
    return old.get("codec") == json.loads(cfg.to_json())["codec"] and old.get("max_size") == cfg.max_size


def _check_trainable(cfg: ModelConfig) -> None:
    cc = cfg.codec
    if not cc.losses or cc.total_steps < 1:
        raise ConfigError(
            f"codec {cc.net.type}: nothing to train it with (codec.losses has {len(cc.losses)} entries, "
            f"codec.train_images {cc.train_images} < train_batch_size {cc.train_batch_size}). List codec.losses "
            '(e.g. [{"type": "L1Loss"}, {"type": "StructureLoss", "weight": 0.1}, {"type": "KLLoss"}]) and set '
            "codec.train_images, or load a trained codec with --codec-ckpt"
        )
    check_losses(cc.losses, cc.net.type)


def _train_steps(cfg: ModelConfig, codec: nn.Module, opt, train, device, step: int, save, log, progress: bool) -> int:
    """Optimizer steps `step` .. `total_steps`, accumulating minibatches; returns the last step."""
    cc = cfg.codec
    total, accum, mb = cc.total_steps, cc.accumulation_steps, cc.minibatch
    # the k-th image drawn depends only on (seed, k): a continued run draws what an uninterrupted
    # one would (with the RNG state restored by the caller, resume is exact on CPU)
    batch = min(mb, len(train))
    loader = DataLoader(
        train,
        batch_size=batch,
        sampler=StepSampler(len(train), cfg.seed, start=step * accum * batch),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    batches = iter(loader)
    augment = build_augment(list(cc.augmentations))
    codec.train()
    bar = tqdm(total=total, initial=step, desc="codec", disable=not progress, dynamic_ncols=True)
    last_save = time.monotonic()
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cc.learning_rate, cc.lr_schedule, cc.warmup_fraction)
        opt.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        for _ in range(accum):
            x = augment_batch(next(batches), augment).to(device)
            loss, values, _ = codec_losses(codec, x, cc.losses)
            (loss / accum).backward()
            for k, v in values.items():
                parts[k] = parts.get(k, 0.0) + v / accum
            parts["loss"] = parts.get("loss", 0.0) + float(loss.detach()) / accum
        if cc.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(codec.parameters(), cc.gradient_clip)
        opt.step()
        step += 1
        bar.update(1)
        if step % LOG_EVERY == 0 or step == total:
            bar.set_postfix(loss=f"{parts['loss']:.4f}", refresh=False)
            if log is not None:
                log({f"codec/{k}": v for k, v in parts.items()}, step)
        due_steps = cc.checkpoint_every_steps is not None and step % cc.checkpoint_every_steps == 0
        if (due_steps or time.monotonic() - last_save >= cc.checkpoint_every_minutes * 60) and step < total:
            save(step)
            last_save = time.monotonic()
    bar.close()
    codec.eval()
    return step


def train_codec(
    cfg: ModelConfig,
    manifest: Path,
    out_dir: Path,
    device: str | torch.device = "cpu",
    store=None,
    log: LogFn | None = None,
    progress: bool = True,
) -> CodecResult:
    """Train the codec `cfg.codec` names; writes out_dir/codec.pt ({"codec": state, "config": ...}).

    Identity needs no training: its (empty) checkpoint is written so every run has one.
    A finished checkpoint for the same codec config is reused; an unfinished one is continued.
    """
    from rfp_core.checkpoint import load_checkpoint, save_checkpoint

    cc = cfg.codec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_temps(out_dir)  # temp files of a call killed mid-write
    path = out_dir / "codec.pt"
    cfg_json = json.loads(cfg.to_json())
    if cc.net.type == "Identity":
        save_checkpoint(
            path, {"codec": {}, "config": cfg_json, "recon_l1": 0.0, "recon_l1_init": 0.0, "steps": 0, "finished": True}
        )
        return CodecResult(path, 0.0, 0, 0.0)
    old = load_checkpoint(path, map_location="cpu") if path.exists() else {}
    if old and not _same_setup(old, cfg):
        old = {}
    if old.get("finished"):
        return CodecResult(path, float(old["recon_l1"]), int(old["steps"]), float(old.get("recon_l1_init", "nan")))
    _check_trainable(cfg)

    device = torch.device(device)
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    torch.manual_seed(cfg.seed)
    codec = build_codec(cc.net).to(device)
    if cfg.max_size % codec.downsample:
        raise ValueError(
            f"max_size {cfg.max_size} must be a multiple of the codec's downsampling {codec.downsample} "
            "(len(ch_mult) - 1 halvings)"
        )
    opt = torch.optim.AdamW(codec.parameters(), lr=cc.learning_rate, weight_decay=0.0)
    holdout = _evenly(_datasets(cfg, manifest, store, "holdout"), MAX_EVAL_IMAGES)
    step = 0
    if old:  # an interrupted run of the same codec: continue where it stopped
        codec.load_state_dict(old["codec"])
        opt.load_state_dict(old["optimizer"])
        step, recon_init = int(old["steps"]), float(old["recon_l1_init"])
        print(f"codec: resuming from {path} at step {step}", file=sys.stderr)
    else:
        recon_init = reconstruction_l1(codec, holdout, device)

    def save(at: int, finished: bool = False, recon: float = float("nan")) -> None:
        save_checkpoint(
            path,
            {
                "codec": {k: v.cpu() for k, v in codec.state_dict().items()},
                "config": cfg_json,
                "optimizer": opt.state_dict(),
                "recon_l1": recon,
                "recon_l1_init": recon_init,
                "steps": at,
                "finished": finished,
                "rng": rng_state(device),
            },
        )

    train = _datasets(cfg, manifest, store, "train")
    if "rng" in old:  # last: nothing between here and the first step draws from the RNG
        set_rng_state(old["rng"], device)
    step = _train_steps(cfg, codec, opt, train, device, step, save, log, progress)
    recon = reconstruction_l1(codec, holdout, device)
    if log is not None:
        log({"codec/recon_l1": recon, "codec/recon_l1_init": recon_init}, step)
    save(step, finished=True, recon=recon)
    return CodecResult(path, recon, step, recon_init)
