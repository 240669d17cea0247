"""The velocity phase's speed switches (`velocity.bf16`, `.channels_last`, `.adamw`, `.compile`, `.cpu_threads`).

Each is measured on/off, with its effect on the numbers, by `rfp bench train --switches`
(docs/BENCHMARKS.md). The defaults are the plain path, except bf16: the one switch that won by a
wide margin (1.5x on the original's small nets) with the same translation quality over three seeds,
so left out of a config it is on where the device has bf16 kernels. TF32 has no switch here: its
flags act on CUDA matmuls and convolutions only (measured: no effect on CPU steps).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from rfp_core.config import VelocityConfig


def prepare_net(model: nn.Module, vc: VelocityConfig) -> nn.Module:
    """The net in the memory layout asked for. Channels-last weights make every conv's output
    channels-last too (torch follows the weight's layout), so the inputs need no conversion."""
    return model.to(memory_format=torch.channels_last) if vc.channels_last else model


def make_optimizer(model: nn.Module, vc: VelocityConfig) -> torch.optim.AdamW:
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[vc.adamw]
    return torch.optim.AdamW(model.parameters(), lr=vc.learning_rate, weight_decay=vc.weight_decay, **impl)


def compiled(net: nn.Module, vc: VelocityConfig) -> nn.Module:
    """`net` compiled by torch.compile (on its first call) when asked; `net` itself otherwise. The
    weights stay those of `net`: checkpoints save the uncompiled module."""
    return torch.compile(net) if vc.compile else net


def set_threads(vc: VelocityConfig, device: torch.device) -> None:
    """Intra-op threads for a CPU run, when the config names a count."""
    if vc.cpu_threads is not None and device.type == "cpu":
        torch.set_num_threads(vc.cpu_threads)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 convolutions and matmuls in hardware: a CUDA GPU that supports
    bf16, or a CPU whose oneDNN has bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def uses_bf16(vc: VelocityConfig, device: torch.device) -> bool:
    """Whether the velocity net trains under bf16 autocast: `velocity.bf16` if set, else (None) where
    `device` has native bf16 kernels. Only CUDA and CPU have bf16 autocast here."""
    wanted = native_bf16(device) if vc.bf16 is None else vc.bf16
    return wanted and device.type in ("cuda", "cpu")


def velocity_autocast(vc: VelocityConfig, device: torch.device):
    """The context the velocity net's forward runs in: bf16 autocast (`uses_bf16`), or a null context.
    The saliency loss turns autocast off inside itself, so its Jacobian-vector product stays in
    float32 (docs/BENCHMARKS.md: the original's bf16 jvp moves the gradient by 20-35%)."""
    if vc.bf16 and device.type not in ("cuda", "cpu"):
        print(f"velocity.bf16: no bf16 autocast on {device.type}; training in float32", file=sys.stderr)
    if not uses_bf16(vc, device):
        return contextlib.nullcontext()
    if vc.bf16 and not native_bf16(device):
        print(
            f"velocity.bf16: this {device.type} has no native bf16 kernels, so bf16 autocast will be slower "
            "than float32; set velocity.bf16 false",
            file=sys.stderr,
        )
    return torch.autocast(device.type, dtype=torch.bfloat16)
