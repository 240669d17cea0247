"""Velocity UNet v(x, t), the original trainer's layout and parameter names.

   input_block (5x5 conv)
   enc_blocks[i]: num_res_blocks ResBlocks at level i (+ self-attention if i in attention_resolutions),
                  each level's output kept as a skip, then down_blocks[i] (AvgPool | StridedConv)
   [mid_res1 -> mid_attn -> mid_res2]                                   (mid_attention)
   dec_blocks[i], deepest first: up_blocks[i+1](h) concatenated with skip i (the deepest level
                  takes h alone), num_res_blocks ResBlocks (+ attention)
   output_block: num_res_blocks unconditional ResBlocks -> norm -> act -> 3x3 conv -> output activation

Time enters every conditioned ResBlock as FiLM on its second norm (adaptive group norm).
`attention_resolutions` are LEVEL indices into ch_mult (0 = full resolution), as in the original.
`zero_out` (this project's option, off by default) zero-initialises the last conv, so v = 0 at
initialisation and coordinates the saliency loss does not constrain stay put (docs/METHOD.md).
"""

from __future__ import annotations

import torch
from torch import nn

from rfp_core.config import UNetConfig
from rfp_core.nets.layers import (
    ResBlock,
    SelfAttention,
    TimestepSequential,
    activation,
    downsample,
    normalization,
    timestep_embedding,
    upsample,
    zero_,
)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, in_channels: int = 3, out_channels: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        mc, mult, norm, act = cfg.model_channels, cfg.ch_mult, cfg.normalization, cfg.activation
        self.factor = 2 ** (len(mult) - 1)
        time_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.input_block = nn.Sequential(nn.Conv2d(in_channels, mc, 5, padding=2))

        def stack(cin: int, cout: int, time: int) -> nn.Sequential:
            blocks = [
                ResBlock(cin if i == 0 else cout, cout, norm, act, cfg.zero_res_blocks, time)
                for i in range(cfg.num_res_blocks)
            ]
            return TimestepSequential(*blocks) if time else nn.Sequential(*blocks)

        def attention(ch: int, level: int) -> nn.Module:
            if level in cfg.attention_resolutions:
                return SelfAttention(ch, cfg.num_attention_heads, norm)
            return nn.Identity()

        enc, dec, down, up, enc_attn, dec_attn = [], [], [], [], [], []
        ch = mc
        for i, m in enumerate(mult):
            width = mc * m
            deeper = mc * mult[i + 1] if i < len(mult) - 1 else 0
            enc.append(stack(ch, width, time_dim))
            if i < len(mult) - 1:
                down.append(downsample(cfg.downsample, width))
            dec.append(stack(width + deeper, width, time_dim))
            up.append(upsample(cfg.upsample, width) if i > 0 else nn.Identity())
            enc_attn.append(attention(width, i))
            dec_attn.append(attention(width, i))
            ch = width
        self.enc_blocks, self.down_blocks = nn.ModuleList(enc), nn.ModuleList(down)
        self.dec_blocks, self.up_blocks = nn.ModuleList(dec), nn.ModuleList(up)
        self.enc_attn, self.dec_attn = nn.ModuleList(enc_attn), nn.ModuleList(dec_attn)
        self.has_mid_block = cfg.mid_attention
        if cfg.mid_attention:
            self.mid_res1 = ResBlock(ch, ch, norm, act, cfg.zero_res_blocks, time_dim)
            self.mid_attn = SelfAttention(ch, cfg.num_attention_heads, norm)
            self.mid_res2 = ResBlock(ch, ch, norm, act, cfg.zero_res_blocks, time_dim)
        self.output_block = nn.Sequential(
            stack(mc, mc, 0),
            normalization(norm, mc),
            activation(act),
            nn.Conv2d(mc, out_channels, 3, padding=1),
            activation(cfg.output_activation),
        )
        if cfg.zero_out:
            zero_(self.output_block[3])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1] -> velocity (B, C_out, H, W)."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(
                f"UNet input {x.shape[-2]}x{x.shape[-1]}: each side must be divisible by {self.factor} "
                f"(2^(len(ch_mult)-1) with ch_mult={self.cfg.ch_mult}); resize or change max_size"
            )
        t_emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        h = self.input_block(x)
        skips = []
        for i, block in enumerate(self.enc_blocks):
            h = self.enc_attn[i](block(h, t_emb))
            skips.append(h)
            if i < len(self.down_blocks):
                h = self.down_blocks[i](h)
        if self.has_mid_block:
            h = self.mid_res2(self.mid_attn(self.mid_res1(h, t_emb)), t_emb)
        last = len(self.dec_blocks) - 1
        for i in range(last, -1, -1):
            h_in = h if i == last else torch.cat([self.up_blocks[i + 1](h), skips[i]], dim=1)
            h = self.dec_attn[i](self.dec_blocks[i](h_in, t_emb))
        return self.output_block(self.up_blocks[0](h))
