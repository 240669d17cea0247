"""`rfp bench train`: velocity-training step time, fast saliency loss vs the original formulation.

One process, one fixed config, the same nets / data / optimizer for every variant; variants run
in alternating blocks (after a warm-up) so machine load hits them alike; medians are reported.
Variants, each a full step (UNet forward, loss, backward, AdamW step):
  fast       - `saliency_weighted_loss` with `SaliencyNet.frozen_h()` (what training uses)
  fast_plain - `saliency_weighted_loss` on the unmodified `net.h` (the loss alone, no net prep)
  reference  - `reference_saliency_loss` on `net.h` (the original trainer: double-backward jvp)
  generative - plain velocity MSE (no saliency at all)
"""

from __future__ import annotations

import copy
import platform
import statistics
import time

import torch
from tqdm import tqdm

from rfp_core import flow
from rfp_core.config import SaliencyNetConfig, UNetConfig
from rfp_core.nets.saliency import SaliencyNet
from rfp_core.nets.unet import UNet

# The original trainer's smallest config ("small": UNet 64 ch, ch_mult [1,2,4,4], 2 res blocks,
# ResNet-18 saliency) at 64 px: realistic relative sizes of the two nets.
FULL = dict(size=64, batch=8, unet=dict(model_channels=64, ch_mult=[1, 2, 4, 4], num_res_blocks=2), backbone="resnet18",
            rounds=5, block=2)
QUICK = dict(size=32, batch=4, unet=dict(model_channels=32, ch_mult=[1, 2, 2], num_res_blocks=1), backbone="resnet18",
             rounds=3, block=1)


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(quick: bool = False, device: str | None = None, spec: dict | None = None) -> dict:
    label = "custom" if spec else "quick" if quick else "full"
    spec = dict(spec or (QUICK if quick else FULL))
    dev = _device(device)
    torch.manual_seed(0)
    bf16 = dev.type == "cuda"
    unet_cfg = UNetConfig(**spec["unet"])
    sal = SaliencyNet(SaliencyNetConfig(backbone=spec["backbone"], pretrained=False)).to(dev).eval().requires_grad_(False)
    frozen_h = sal.frozen_h()
    base = UNet(unet_cfg).to(dev)
    b, s = spec["batch"], spec["size"]
    x0 = torch.rand(b, 3, s, s, device=dev) * 2 - 1
    x1 = torch.rand(b, 3, s, s, device=dev) * 2 - 1

    losses = {
        "fast": lambda xt, tgt, v: flow.saliency_weighted_loss(frozen_h, xt, tgt, v),
        "fast_plain": lambda xt, tgt, v: flow.saliency_weighted_loss(sal.h, xt, tgt, v),
        "reference": lambda xt, tgt, v: flow.reference_saliency_loss(sal.h, xt, tgt, v),
        "generative": lambda xt, tgt, v: flow.velocity_mse_loss(v, tgt),
    }
    nets = {k: copy.deepcopy(base) for k in losses}
    opts = {k: torch.optim.AdamW(nets[k].parameters(), lr=2e-4, weight_decay=1e-4) for k in losses}
    gen = torch.Generator().manual_seed(0)

    def step(kind: str) -> None:
        t = flow.sample_timesteps(b, "logit-normal", dev, generator=gen)
        xt, tgt = flow.interpolate(x0, x1, t), x1 - x0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            v = nets[kind](xt, t)
            loss = losses[kind](xt, tgt, v)
        opts[kind].zero_grad(set_to_none=True)
        loss.backward()
        opts[kind].step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    wall: dict[str, list[float]] = {k: [] for k in losses}
    cpu: dict[str, list[float]] = {k: [] for k in losses}
    for kind in losses:  # warm-up: allocator, oneDNN primitive caches, autotuning
        step(kind)
    sync()
    for _ in tqdm(range(spec["rounds"]), desc="bench train", leave=False):
        for kind in losses:
            for _ in range(spec["block"]):
                w0, c0 = time.perf_counter(), time.process_time()
                step(kind)
                sync()
                wall[kind].append(time.perf_counter() - w0)
                cpu[kind].append(time.process_time() - c0)

    ms = {k: 1e3 * statistics.median(v) for k, v in wall.items()}
    cpu_ms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    # the saliency part alone = translation step minus generative step (same UNet work)
    sal_ms = {k: ms[k] - ms["generative"] for k in ("fast", "fast_plain", "reference")}
    return {
        "speedup_vs_reference": round(ms["reference"] / ms["fast"], 3),
        "translation_over_generative": round(ms["fast"] / ms["generative"], 3),
        "images_per_s": round(b / (ms["fast"] / 1e3), 2),
        "ms_per_step": {k: round(v, 1) for k, v in ms.items()},
        "cpu_ms_per_step": {k: round(v, 1) for k, v in cpu_ms.items()},
        "saliency_ms_per_step": {k: round(v, 1) for k, v in sal_ms.items()},
        "saliency_part_speedup": round(sal_ms["reference"] / max(sal_ms["fast"], 1e-9), 3),
        "speedup_loss_only_vs_reference": round(ms["reference"] / ms["fast_plain"], 3),
        "config": {
            "image_size": s, "batch": b, "unet": spec["unet"], "saliency_backbone": spec["backbone"],
            "unet_params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 2),
            "saliency_params_m": round(sum(p.numel() for p in sal.parameters()) / 1e6, 2),
            "optimizer": "AdamW(lr=2e-4, wd=1e-4)", "timesteps": "logit-normal",
            "rounds": spec["rounds"], "steps_per_block": spec["block"], "bf16_autocast": bf16,
            "sizes": {"full": "the original trainer's 'small' config (UNet 64ch [1,2,4,4] x2, ResNet-18) at 64 px",
                      "quick": "quick smoke config (not a realistic size ratio)", "custom": "custom"}[label],
        },
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
