"""Velocity UNet v(x, t), in the style of guided-diffusion / DiT but flat.

Time enters every res block as adaptive group norm (FiLM): the norm between the two convs is
scaled and shifted per channel by an MLP of the sinusoidal time embedding, not added as a bias.

`attention_resolutions` lists downsample factors: 1 = full input resolution, 2 = half,
4 = quarter, ... Blocks at those factors get multi-head self-attention.
`zero_out` zero-initialises the output conv, so v = 0 at init: coordinates the saliency loss does
not constrain then stay put instead of drifting (method.md, "What to expect").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rfp_core.config import UNetConfig


# Each group keeps at least this many channels. One channel per group is instance norm, which
# removes every channel's mean over the image: the absolute colour a translation has to change.
# Measured with the demo's 32-channel UNet (MSE, true pairs of demo shapes): the background
# drifted, false foreground 0.87 of the shape's area; 0.31 with groups of 4.
MIN_GROUP_CHANNELS = 4


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm32, or fewer groups for narrow layers: the largest count <= 32 that divides
    `channels` and leaves each group MIN_GROUP_CHANNELS channels (when that is possible)."""
    cap = max(1, min(32, channels // MIN_GROUP_CHANNELS))
    groups = next(g for g in range(cap, 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 so the frequencies span the range)."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = 1000.0 * t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, zero_init: bool):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)  # -> (scale, shift) of norm2
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init:
            zero_(self.conv2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, heads: int, zero_init: bool):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into num_attention_heads={heads} heads")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        if zero_init:
            zero_(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hh, ww))


class Block(nn.Module):
    """One res block, optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, cfg.zero_res_blocks)
        self.attn = AttentionBlock(out_ch, cfg.num_attention_heads, cfg.zero_res_blocks) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.factor = 2 ** (len(cfg.ch_mult) - 1)
        attn_at = set(cfg.attention_resolutions)
        self.time_mlp = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.in_conv = nn.Conv2d(in_channels, mc, 3, padding=1)

        # encoder: num_res_blocks per level, a stride-2 conv between levels; every output is a skip
        self.down = nn.ModuleList()
        skips, ch = [mc], mc
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Block(ch, mc * mult, emb_dim, cfg, 2**level in attn_at))
                ch = mc * mult
                skips.append(ch)
            if level < len(cfg.ch_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)

        deepest = 2 ** (len(cfg.ch_mult) - 1) in attn_at
        self.middle = nn.ModuleList([Block(ch, ch, emb_dim, cfg, deepest), Block(ch, ch, emb_dim, cfg, False)])

        # decoder: num_res_blocks + 1 per level, each eating one skip, upsampling between levels
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for i in range(cfg.num_res_blocks + 1):
                self.up.append(Block(ch + skips.pop(), mc * mult, emb_dim, cfg, 2**level in attn_at))
                ch = mc * mult
                if level > 0 and i == cfg.num_res_blocks:
                    self.up.append(Upsample(ch))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        if cfg.zero_out:
            zero_(self.out[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) in [0, 1]. Returns the velocity, same shape as x."""
        h_, w_ = x.shape[-2:]
        assert h_ % self.factor == 0 and w_ % self.factor == 0, (
            f"UNet input {h_}x{w_}: each side must be divisible by {self.factor} "
            f"(2^(len(ch_mult)-1) with ch_mult={self.cfg.ch_mult}); resize or change max_size"
        )
        emb = self.time_mlp(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        h = self.in_conv(x)
        skips = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, Block) else m(h)
            skips.append(h)
        for m in self.middle:
            h = m(h, emb)
        for m in self.up:
            h = m(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(m, Block) else m(h)
        return self.out(h)
