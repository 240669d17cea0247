"""`rfp bench train`: velocity-training step time, fast saliency loss vs the original formulation.

One process; per config, the same nets / data / optimizer for every variant; variants run in
alternating blocks after a warm-up, so machine load hits them alike; medians are reported.
The headline keys come from the project's CPU training config (TINY); full mode adds the original
trainer's smallest config (ORIGINAL_SMALL), where the UNet dwarfs the saliency net and any loss
formulation is a few percent of the step. Data are random tensors: this measures the step.

Full training steps (UNet forward, loss, backward, AdamW step):
  fast       - `saliency_weighted_loss` with `SaliencyNet.frozen_h()` (what training uses)
  reference  - `reference_saliency_loss` on `net.h` (the original trainer's double-backward jvp),
               with the original loop's per-step `gc.collect()`
  generative - plain velocity MSE (no saliency)
Where the device has bf16 kernels (`speed.native_bf16`), each again as `<kind>_bf16` under bf16
autocast (`velocity.bf16`): the original autocasts its whole loss, this project's loss keeps its jvp
in float32; `jvp_precision` measures what each does to the gradient.
The loss step alone (saliency loss + backward to v, no UNet): fast, fast_plain (the fast loss on
the unmodified `net.h`) and reference. FLOPs per image (torch's FlopCounterMode) give the same
ratios without timing noise.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from rfp_core.bench.report import device_name
from rfp_core.config import DiTConfig, SaliencyNetConfig, UNetConfig
from rfp_core.device import pick_device
from rfp_core.flow import rf
from rfp_core.nets import build_velocity_net
from rfp_core.nets.saliency import SaliencyNet
from rfp_core.train.speed import native_bf16

# Headline: the nets this project trains on CPU (configs/tiny.json: UNet 16 ch [1,2] x1 res block,
# ResNet-18, 32 px, minibatch 8). Beside it, the original trainer's smallest real configs ("small":
# UNet 64 ch [1,2,4,4] x2, ResNet-18; "small_dit"), where the net is ~50x the saliency net's FLOPs.
TINY = dict(
    name="project_tiny_32px",
    size=32,
    batch=8,
    unet=dict(model_channels=16, ch_mult=[1, 2], num_res_blocks=1, normalization="GroupNormAuto"),
    backbone="resnet18",
    rounds=15,
    block=2,
    loss_rounds=15,
    sizes="configs/tiny.json nets: UNet 16ch [1,2] x1 res block + ResNet-18 (11.4M), 32 px, minibatch 8",
)
# the original's own configs at their max_size (128 px), scaled only in batch to fit one CPU core
ORIGINAL_SMALL = dict(
    name="original_small_128px",
    size=128,
    batch=1,
    unet=dict(model_channels=64, ch_mult=[1, 2, 4, 4], num_res_blocks=2),
    backbone="resnet18",
    rounds=3,
    block=1,
    loss_rounds=3,
    sizes="the original trainer's 'small' config: UNet 64ch [1,2,4,4] x2 + ResNet-18, at its 128 px, batch 1",
)
ORIGINAL_SMALL_DIT = dict(
    name="original_small_dit_128px",
    size=128,
    batch=1,
    unet=dict(type="DiT", patch_size=2, hidden_size=256, depth=12, num_heads=4),
    backbone="resnet18",
    rounds=2,
    block=1,
    loss_rounds=3,
    sizes="the original trainer's 'small_dit' config (bf16 on there): DiT patch 2, 256 wide, depth 12 + "
    "ResNet-18, at its 128 px, batch 1",
)
# the same nets at 64 px, batch 2: the speed switches' table (torch.compile at 128 px takes too long here)
ORIGINAL_SMALL_64 = dict(ORIGINAL_SMALL, name="original_small_64px", size=64, batch=2, loss_rounds=5)
ORIGINAL_SMALL_64["sizes"] = ORIGINAL_SMALL["sizes"].replace("at its 128 px, batch 1", "at 64 px, batch 2")
ORIGINAL_SMALL_DIT_64 = dict(ORIGINAL_SMALL_DIT, name="original_small_dit_64px", size=64, batch=2, rounds=3)
ORIGINAL_SMALL_DIT_64["sizes"] = ORIGINAL_SMALL_DIT["sizes"].replace("at its 128 px, batch 1", "at 64 px, batch 2")
QUICK = dict(TINY, name="project_tiny_32px_quick", rounds=2, block=1, loss_rounds=2)

TARGETS = {"speedup_vs_reference": 1.8, "translation_over_generative": 1.6}


def _gflops(fn: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _alternate(variants: dict[str, Callable[[], None]], rounds: int, block: int, sync: Callable[[], None], desc: str):
    """Median wall and CPU seconds per call of each variant, run in alternating blocks."""
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: allocator, oneDNN primitive caches, autotuning
        fn()
    sync()
    for _ in tqdm(range(rounds), desc=desc, leave=False):
        for name, fn in variants.items():
            for _ in range(block):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    med = lambda d: {k: 1e3 * statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def run(quick: bool = False, device: str | None = None) -> dict:
    """Headline figures on the project's CPU config; full mode adds the original 'small' configs."""
    dev = pick_device(device)
    head = measure(QUICK if quick else TINY, dev)
    result = {k: head.pop(k) for k in ("speedup_vs_reference", "translation_over_generative", "images_per_s")}
    result["targets"] = {k: (">= " if k.startswith("speedup") else "<= ") + str(v) for k, v in TARGETS.items()}
    result["configs"] = {head["config"]["name"]: head}
    if not quick:
        for spec in (ORIGINAL_SMALL, ORIGINAL_SMALL_DIT):
            other = measure(spec, dev)
            result["configs"][other["config"]["name"]] = other
    result.update(
        device=device_name(dev),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        native_bf16=native_bf16(dev),
    )
    return result


def _step_variants(dev: torch.device) -> tuple[str, ...]:
    """Every step variant in float32; in bf16 autocast too where the device has bf16 kernels."""
    kinds = ("fast", "reference", "generative")
    return kinds + (tuple(f"{k}_bf16" for k in kinds) if native_bf16(dev) else ())


def _nets_and_data(spec: dict, dev: torch.device) -> tuple[SaliencyNet, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The frozen saliency net, the velocity net and two random domain batches, from seed 0."""
    torch.manual_seed(0)
    sal = (
        SaliencyNet(SaliencyNetConfig(backbone=spec["backbone"], pretrained=False)).to(dev).eval().requires_grad_(False)
    )
    net_cfg = spec["unet"]
    base = build_velocity_net((DiTConfig if net_cfg.get("type") == "DiT" else UNetConfig)(**net_cfg)).to(dev)
    b, s = spec["batch"], spec["size"]
    return sal, base, torch.rand(b, 3, s, s, device=dev) * 2 - 1, torch.rand(b, 3, s, s, device=dev) * 2 - 1


def _losses(sal: SaliencyNet, frozen_h) -> dict[str, Callable]:
    return {
        "fast": lambda xt, tgt, v: rf.saliency_weighted_loss(frozen_h, xt, tgt, v),
        "fast_plain": lambda xt, tgt, v: rf.saliency_weighted_loss(sal.h, xt, tgt, v),
        "reference": lambda xt, tgt, v: rf.reference_saliency_loss(sal.h, xt, tgt, v),
        "generative": lambda xt, tgt, v: rf.velocity_mse_loss(v, tgt),
    }


def measure(spec: dict, dev: torch.device) -> dict:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sal, base, x0, x1 = _nets_and_data(spec, dev)
    frozen_h, b = sal.frozen_h(), spec["batch"]
    gen = torch.Generator().manual_seed(0)
    losses = _losses(sal, frozen_h)
    variants = _step_variants(dev)
    nets = {k: copy.deepcopy(base) for k in variants}
    opts = {k: torch.optim.AdamW(nets[k].parameters(), lr=2e-4, weight_decay=1e-4) for k in variants}

    def train_step(variant: str) -> None:
        kind, bf16 = variant.removesuffix("_bf16"), variant.endswith("_bf16")
        t = rf.sample_timesteps(b, "logit-normal", dev, generator=gen)
        xt, tgt = rf.interpolate(x0, x1, t), x1 - x0
        # the original autocasts its whole loss, jvp included; the fast loss runs its own in float32
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            v = nets[variant](xt, t)
            loss = losses[kind](xt, tgt, v)
        opts[variant].zero_grad(set_to_none=True)
        loss.backward()
        opts[variant].step()
        if kind == "reference":
            gc.collect()  # the original trainer's loop collects garbage after every step

    xt_fixed, tgt_fixed = rf.interpolate(x0, x1, torch.full((b,), 0.5, device=dev)), x1 - x0

    def loss_step(kind: str) -> None:
        v = torch.zeros_like(xt_fixed, requires_grad=True)
        losses[kind](xt_fixed, tgt_fixed, v).backward()

    unet_gf, loss_gf = _flops(base, losses, xt_fixed[:1], tgt_fixed[:1])
    step_ms, step_cpu = _alternate(
        {k: (lambda k=k: train_step(k)) for k in variants}, spec["rounds"], spec["block"], sync, "train steps"
    )
    for p in nets["generative"].parameters():  # the optimizer step alone, on gradients of the net's shapes
        p.grad = torch.full_like(p, 1e-3)
    parts = {k: (lambda k=k: loss_step(k)) for k in ("fast", "fast_plain", "reference")}
    loss_ms, loss_cpu = _alternate(
        {**parts, "optimizer": opts["generative"].step}, spec["loss_rounds"], 1, sync, "loss steps"
    )

    params = {
        "unet_params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 2),
        "saliency_params_m": round(sum(p.numel() for p in sal.parameters()) / 1e6, 2),
    }
    summary = _summary(spec, (step_ms, step_cpu), (loss_ms, loss_cpu), (unet_gf, loss_gf), params)
    if "fast_bf16" in step_ms:
        summary["bf16"] = _bf16_ratios(step_ms, step_cpu, b)
        summary["bf16"]["loss_gradient_rel_error"] = jvp_precision(frozen_h, sal.h, xt_fixed, tgt_fixed)
    return summary


def _bf16_ratios(step_ms: dict, step_cpu: dict, batch: int) -> dict:
    """The bf16 variants against each other and against the original's float32 step."""
    out = {}
    for name, d in (("wall", step_ms), ("cpu", step_cpu)):
        out[name] = {
            "fast_bf16_vs_reference_fp32": round(d["reference"] / d["fast_bf16"], 3),
            "fast_bf16_vs_reference_bf16": round(d["reference_bf16"] / d["fast_bf16"], 3),
            "fast_bf16_vs_fast_fp32": round(d["fast"] / d["fast_bf16"], 3),
            "translation_over_generative_bf16": round(d["fast_bf16"] / d["generative_bf16"], 3),
        }
    out["images_per_s"] = round(batch / (step_ms["fast_bf16"] / 1e3), 3)
    return out


def jvp_precision(frozen_h, h, x_t: torch.Tensor, target: torch.Tensor) -> dict:
    """Relative error (max |g - g32| / max |g32|) of the saliency loss's gradient w.r.t. the velocity,
    against float32: the fast loss under bf16 autocast (it keeps its jvp in float32) and the original's
    double-backward jvp under bf16 autocast, as its trainer runs it with `bf16` set."""
    v0 = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)).to(x_t.device) * 0.1

    def grad(loss_fn, bf16: bool) -> torch.Tensor:
        v = v0.clone().requires_grad_(True)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(frozen_h if loss_fn is rf.saliency_weighted_loss else h, x_t, target, v)
        (g,) = torch.autograd.grad(loss, v)
        return g.float()

    rel = lambda a, b: round(float((a - b).abs().max() / b.abs().max()), 6)  # noqa: E731
    fast32 = grad(rf.saliency_weighted_loss, False)
    ref32 = grad(rf.reference_saliency_loss, False)
    return {
        "fast_under_bf16_autocast": rel(grad(rf.saliency_weighted_loss, True), fast32),
        "reference_under_bf16_autocast": rel(grad(rf.reference_saliency_loss, True), ref32),
    }


def _flops(base, losses: dict, one: torch.Tensor, tgt: torch.Tensor) -> tuple[float, dict]:
    """GFLOPs per image (batch of one), free of timing noise: the UNet's forward + backward, and each
    saliency loss formulation's."""
    unet_gf = _gflops(lambda: base(one, torch.full((1,), 0.5, device=one.device)).sum().backward())
    base.zero_grad(set_to_none=True)
    loss_gf = {}
    for kind in ("fast", "fast_plain", "reference"):
        v1 = torch.zeros_like(one, requires_grad=True)
        loss_gf[kind] = _gflops(lambda: losses[kind](one, tgt, v1).backward())  # noqa: B023
    return unet_gf, loss_gf


def _summary(
    spec: dict,
    steps: tuple[dict, dict],
    loss_steps: tuple[dict, dict],
    gflops: tuple[float, dict],
    params: dict,
) -> dict:
    """The measured times and FLOPs as the benchmark's ratios and the config they were made with."""
    (step_ms, step_cpu), (loss_ms, loss_cpu), (unet_gf, loss_gf) = steps, loss_steps, gflops
    b, s = spec["batch"], spec["size"]
    net_ms = step_ms["generative"] - loss_ms["optimizer"]
    return {
        "step_fractions": {  # of the float32 translation step: net fwd+bwd, the loss, AdamW
            "velocity_net": round(net_ms / step_ms["fast"], 3),
            "loss": round((step_ms["fast"] - step_ms["generative"]) / step_ms["fast"], 3),
            "optimizer": round(loss_ms["optimizer"] / step_ms["fast"], 3),
        },
        "speedup_vs_reference": round(step_ms["reference"] / step_ms["fast"], 3),
        "translation_over_generative": round(step_ms["fast"] / step_ms["generative"], 3),
        "images_per_s": round(b / (step_ms["fast"] / 1e3), 3),
        "ms_per_step": {k: round(v, 1) for k, v in step_ms.items()},
        "cpu_ms_per_step": {k: round(v, 1) for k, v in step_cpu.items()},
        "cpu_time_ratios": {
            "speedup_vs_reference": round(step_cpu["reference"] / step_cpu["fast"], 3),
            "translation_over_generative": round(step_cpu["fast"] / step_cpu["generative"], 3),
        },
        "loss_step_ms": {k: round(v, 1) for k, v in loss_ms.items()},
        "loss_step_cpu_ms": {k: round(v, 1) for k, v in loss_cpu.items()},
        "loss_step_speedup_vs_reference": round(loss_ms["reference"] / loss_ms["fast"], 3),
        "loss_step_speedup_plain_h": round(loss_ms["reference"] / loss_ms["fast_plain"], 3),
        "gflops_per_image": {
            "unet_fwd_bwd": round(unet_gf, 3),
            **{f"loss_{k}": round(v, 3) for k, v in loss_gf.items()},
        },
        "flop_ratios": {
            "speedup_vs_reference": round((unet_gf + loss_gf["reference"]) / (unet_gf + loss_gf["fast"]), 3),
            "translation_over_generative": round((unet_gf + loss_gf["fast"]) / unet_gf, 3),
            "loss_step_speedup": round(loss_gf["reference"] / loss_gf["fast"], 3),
        },
        "config": {
            "name": spec["name"],
            "sizes": spec["sizes"],
            "image_size": s,
            "batch": b,
            "unet": spec["unet"],
            "saliency_backbone": spec["backbone"],
            "saliency_pretrained": False,
            **params,
            "optimizer": "AdamW(lr=2e-4, weight_decay=1e-4)",
            "timesteps": "logit-normal",
            "data": "random tensors",
            "rounds": spec["rounds"],
            "steps_per_block": spec["block"],
            "loss_rounds": spec["loss_rounds"],
            "headline_precision": "float32",
        },
    }
