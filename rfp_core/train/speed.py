"""The velocity phase's speed switches (`velocity.channels_last`, `.adamw`, `.compile`, `.cpu_threads`).

Each is measured on/off, with its effect on the numbers, by `rfp bench train --switches`
(docs/BENCHMARKS.md). The defaults are the plain path: a switch stays off by default unless it
wins and leaves the weights bit for bit the same. TF32 has no switch here: its flags act on CUDA
matmuls and convolutions only (measured: no effect on CPU steps).
"""

from __future__ import annotations

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
