"""The building blocks the original trainer's nets are made of, with its parameter names.

Every block keeps the original's module layout (`in_layers`, `out_norm`, `q_proj`, ...), so
a state dict written by the original trainer loads here with `strict=True`.

Normalisation names are the original's: "GroupNorm32" is exactly 32 groups (so the width must
be a multiple of 32), "GroupNorm16", "BatchNorm2d", "InstanceNorm2d", "None". This project adds
"GroupNormAuto": 32 groups where the width allows, fewer for narrow layers so that each group
keeps at least MIN_GROUP_CHANNELS channels. One channel per group is instance norm, which removes
every channel's mean over the image - the absolute colour a translation has to change (see
docs/METHOD.md, "narrow layers").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rfp_core.config import ConfigError

MIN_GROUP_CHANNELS = 4
NORMALIZATIONS = ("GroupNorm32", "GroupNorm16", "GroupNormAuto", "BatchNorm2d", "InstanceNorm2d", "None")
ACTIVATIONS = ("SiLU", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "None")


def auto_groups(channels: int) -> int:
    """The largest group count <= 32 that divides `channels` and keeps MIN_GROUP_CHANNELS a group."""
    cap = max(1, min(32, channels // MIN_GROUP_CHANNELS))
    return next(g for g in range(cap, 0, -1) if channels % g == 0)


def normalization(name: str, channels: int) -> nn.Module:
    if name in ("GroupNorm32", "GroupNorm16"):
        groups = 32 if name == "GroupNorm32" else 16
        if channels % groups:
            raise ValueError(
                f"normalization {name} needs a width divisible by {groups}, got {channels} channels; "
                'use "GroupNormAuto" for narrow nets'
            )
        return nn.GroupNorm(groups, channels)
    if name == "GroupNormAuto":
        return nn.GroupNorm(auto_groups(channels), channels)
    if name == "BatchNorm2d":
        return nn.BatchNorm2d(channels)
    if name == "InstanceNorm2d":
        return nn.InstanceNorm2d(channels)
    if name == "None":
        return nn.Identity()
    raise ValueError(f"unknown normalization {name!r}; use one of {', '.join(NORMALIZATIONS)}")


def activation(name: str) -> nn.Module:
    if name == "Softmax":  # the original's nn.Softmax() has no dim: which axis it meant is unclear
        raise ConfigError(
            'activation "Softmax" (the original trainer has it) is not supported yet; use "Sigmoid" or "Tanh"'
        )
    table = {
        "SiLU": nn.SiLU,
        "ReLU": nn.ReLU,
        "LeakyReLU": nn.LeakyReLU,
        "Tanh": nn.Tanh,
        "Sigmoid": nn.Sigmoid,
        "None": nn.Identity,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return table[name]()


def downsample(name: str, channels: int) -> nn.Module:
    if name == "AvgPool":
        return nn.AvgPool2d(2)
    if name == "StridedConv":
        return nn.Conv2d(channels, channels, 3, stride=2, padding=1)
    raise ValueError(f"unknown downsample {name!r}; use 'AvgPool' or 'StridedConv'")


def upsample(name: str, channels: int) -> nn.Module:
    if name == "Bilinear":
        return nn.UpsamplingBilinear2d(scale_factor=2)  # align_corners=True, as the original
    if name == "NearestConv":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1))
    raise ValueError(f"unknown upsample {name!r}; use 'Bilinear' or 'NearestConv'")


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (x1000, the diffusion convention): [sin | cos], (B, dim)."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * (-math.log(10000.0) / (half - 1)))
    args = t.to(dtype)[:, None] * freqs[None] * 1000.0
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """norm -> act -> conv -> norm -> [FiLM by t] -> act -> conv, plus a (1x1) skip.

    With `time_dim > 0` the time embedding scales and shifts the second norm per channel
    (adaptive group norm); with 0 the block is unconditional.
    """

    def __init__(self, cin: int, cout: int, norm: str, act: str, zero_out: bool = False, time_dim: int = 0):
        super().__init__()
        self.time_dim = time_dim
        self.in_layers = nn.Sequential(normalization(norm, cin), activation(act), nn.Conv2d(cin, cout, 3, padding=1))
        self.out_norm = normalization(norm, cout)
        self.out_act = activation(act)
        self.out_conv = nn.Conv2d(cout, cout, 3, padding=1)
        if zero_out:
            zero_(self.out_conv)
        if time_dim > 0:
            self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * cout))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.out_norm(self.in_layers(x))
        if self.time_dim > 0 and t_emb is not None:
            scale, shift = self.time_proj(t_emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1.0 + scale) + shift
        return self.skip_connection(x) + self.out_conv(self.out_act(h))


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the pixels of a feature map, zero-initialised output."""

    def __init__(self, channels: int, heads: int, norm: str):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads (num_attention_heads)")
        self.heads = heads
        self.norm = normalization(norm, channels)
        self.q_proj = nn.Conv2d(channels, channels, 1)
        self.k_proj = nn.Conv2d(channels, channels, 1)
        self.v_proj = nn.Conv2d(channels, channels, 1)
        self.out_proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (
            p(y).view(b, self.heads, c // self.heads, h * w).transpose(-1, -2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )  # each (B, heads, HW, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.out_proj(out.transpose(-1, -2).reshape(b, c, h, w))


class TimestepSequential(nn.Sequential):
    """A stack of ResBlocks that all receive the time embedding."""

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, t_emb)
        return x
