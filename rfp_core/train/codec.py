"""Phase 0: train the VAE codec on frames of both domains (L1 + structure term + small KL).

The perceptual term is a multi-scale structure loss: L1 between image gradients plus
(1 - SSIM)/2, at full, half and quarter resolution. L1 alone is minimised by blurred
edges; matching gradients and local contrast/structure (SSIM) penalises exactly that blur,
across scales. It needs no network weights, so it is deterministic and works offline, where
LPIPS would need downloaded VGG/AlexNet weights.

The KL is summed per image and divided by its pixel count, the same balance against the
per-pixel L1 as Stable Diffusion's autoencoder, so `kl_weight` 1e-6 means what it does there:
just enough to keep the latent bounded and smooth.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm.auto import tqdm

from rfp_core.config import ModelConfig, config_from_dict
from rfp_core.data import FrameDataset
from rfp_core.frame_store import FrameStore
from rfp_core.nets.codec import VAE, build_codec

LogFn = Callable[[dict, int], None]
MAX_EVAL_IMAGES = 256  # held-out images scored for recon_l1
MAX_STATS_IMAGES = 512  # training images whose latents set the per-channel standardisation
LOG_EVERY = 25


@dataclass
class CodecResult:
    checkpoint: Path
    recon_l1: float  # held-out mean |decode(encode(x)) - x|, [-1, 1] units
    steps: int
    recon_l1_init: float = float("nan")  # the same before training


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def _ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM with a 3x3 uniform window, inputs in [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    pool = lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()


def structure_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """Multi-scale gradient L1 + (1 - SSIM)/2 between images in [-1, 1]; 0 iff equal."""
    total = x.new_zeros(())
    used = 0
    for s in range(scales):
        if s:
            if min(x.shape[-2:]) < 8:
                break
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        (gx, gy), (hx, hy) = _gradients(x), _gradients(y)
        grad = (gx - hx).abs().mean() + (gy - hy).abs().mean()
        total = total + grad + (1 - _ssim((x + 1) / 2, (y + 1) / 2)) / 2
        used += 1
    return total / used


def kl_per_pixel(mean: torch.Tensor, logvar: torch.Tensor, pixels: int) -> torch.Tensor:
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
    return kl.mean() / pixels


def _datasets(cfg: ModelConfig, manifest: Path, store, split: str) -> ConcatDataset:
    domains = [1] if cfg.generative else [0, 1]
    frac = cfg.saliency.holdout_fraction  # the frames the saliency phase also holds out
    return ConcatDataset([FrameDataset(manifest, store, d, cfg.max_size, split, frac, train_crop=split == "train") for d in domains])


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


def train_codec(
    cfg: ModelConfig, manifest: Path, out_dir: Path, device: str | torch.device = "cpu",
    store=None, log: LogFn | None = None, progress: bool = True,
) -> CodecResult:
    """Train the codec `cfg.codec` names; writes out_dir/codec.pt ({"codec": state, "config": ...}).

    Identity needs no training: its (empty) checkpoint is written so every run has one.
    A finished checkpoint for the same codec config is reused, not retrained.
    """
    from rfp_core.checkpoint import load_checkpoint, save_checkpoint

    cc = cfg.codec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "codec.pt"
    cfg_json = json.loads(cfg.to_json())
    if cc.net.type == "Identity":
        save_checkpoint(path, {"codec": {}, "config": cfg_json, "recon_l1": 0.0, "recon_l1_init": 0.0, "steps": 0})
        return CodecResult(path, 0.0, 0, 0.0)
    if path.exists():
        old = load_checkpoint(path, map_location="cpu")
        if _same_setup(old, cfg) and old.get("finished"):
            return CodecResult(path, float(old["recon_l1"]), int(old["steps"]), float(old.get("recon_l1_init", "nan")))

    device = torch.device(device)
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    torch.manual_seed(cfg.seed)
    codec: VAE = build_codec(cc.net).to(device)
    if cfg.max_size % codec.downsample:
        raise ValueError(f"max_size {cfg.max_size} must be a multiple of the codec's downsampling {codec.downsample} (len(ch_mult) - 1 halvings)")
    train = _datasets(cfg, manifest, store, "train")
    holdout = _evenly(_datasets(cfg, manifest, store, "holdout"), MAX_EVAL_IMAGES)
    recon_init = reconstruction_l1(codec, holdout, device)

    steps = max(1, cc.train_images // cc.batch_size)
    loader = DataLoader(train, batch_size=min(cc.batch_size, len(train)), shuffle=True, drop_last=True)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    opt = torch.optim.AdamW(codec.parameters(), lr=cc.learning_rate, weight_decay=0.0)
    pixels = 3 * cfg.max_size**2
    codec.train()
    bar = tqdm(range(steps), desc="codec", disable=not progress, dynamic_ncols=True)
    for step in bar:
        x = next(batches).to(device)
        mean, logvar = codec.encode_dist(x)
        raw = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        y = codec.decode_raw(raw)
        l1 = (y - x).abs().mean()
        perceptual = structure_loss(y, x)
        kl = kl_per_pixel(mean, logvar, pixels)
        loss = cc.l1_weight * l1 + cc.perceptual_weight * perceptual + cc.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        if step % LOG_EVERY == 0 or step == steps - 1:
            metrics = {"codec/loss": loss.item(), "codec/l1": l1.item(), "codec/perceptual": perceptual.item(), "codec/kl": kl.item()}
            bar.set_postfix(l1=f"{metrics['codec/l1']:.4f}", refresh=False)
            if log is not None:
                log(metrics, step)
    bar.close()

    # standardise latents on centred crops of training frames (no jitter: the statistic of the data)
    codec.eval()
    stats = _evenly(_datasets(cfg, manifest, store, "all"), MAX_STATS_IMAGES)
    with torch.no_grad():
        means = torch.cat([codec.encode_dist(x.to(device))[0] for x in DataLoader(stats, batch_size=32)])
    codec.fit_latent_stats(means)
    recon = reconstruction_l1(codec, holdout, device)
    if log is not None:
        log({"codec/recon_l1": recon, "codec/recon_l1_init": recon_init}, steps)
    save_checkpoint(path, {
        "codec": {k: v.cpu() for k, v in codec.state_dict().items()}, "config": cfg_json,
        "recon_l1": recon, "recon_l1_init": recon_init, "steps": steps, "finished": True,
    })
    return CodecResult(path, recon, steps, recon_init)


def load_codec(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The codec of a codec.pt (config inside), frozen and in eval mode."""
    from rfp_core.checkpoint import load_checkpoint
    from rfp_core.train.codec_io import load_codec as load_codec_with_config

    ckpt = load_checkpoint(Path(path), map_location="cpu")
    cfg = config_from_dict(ckpt["config"], source=str(path))
    return load_codec_with_config(cfg, None, device, state=ckpt["codec"])
