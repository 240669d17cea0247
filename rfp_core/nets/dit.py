"""Velocity DiT v(x, t) (Peebles & Xie 2022), the original trainer's layout and parameter names.

Patchify with a stride-p conv, add fixed 2-D sin-cos positions, condition every block on the
time embedding through adaLN-Zero (shift, scale, gate regressed from t; zero-initialised, so each
block starts as the identity), project the tokens back to p x p patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rfp_core.config import DiTConfig
from rfp_core.nets.layers import timestep_embedding


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_positions(dim: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(rows * cols, dim): the first half of the channels encodes the row, the second the column."""
    if dim % 4:
        raise ValueError(f"DiT hidden_size must be a multiple of 4 for 2-D positions, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))

    def axis(n: int) -> torch.Tensor:
        angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (n, dim/2)

    grid = torch.cat([axis(rows)[:, None].expand(-1, cols, -1), axis(cols)[None].expand(rows, -1, -1)], dim=2)
    return grid.reshape(rows * cols, dim)


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"DiT hidden_size {hidden} must be divisible by num_heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        b, n, d = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift_a, scale_a)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate_a.unsqueeze(1) * self.attn_out(h)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiTFinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig, in_channels: int = 3, out_channels: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        p, hidden = cfg.patch_size, cfg.hidden_size
        self.factor = p
        self.x_embedder = nn.Conv2d(in_channels, hidden, kernel_size=p, stride=p)
        self.t_embedder = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Linear(4 * hidden, hidden))
        self.blocks = nn.ModuleList(DiTBlock(hidden, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = DiTFinalLayer(hidden, p, self.out_channels)
        self._positions: dict[tuple, torch.Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zeroed:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _pos(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        key = (rows, cols, device)
        if key not in self._positions:
            self._positions[key] = sincos_positions(self.cfg.hidden_size, rows, cols, device)
        return self._positions[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), H and W multiples of patch_size; t: (B,) -> velocity (B, C_out, H, W)."""
        p = self.cfg.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"DiT input {x.shape[-2]}x{x.shape[-1]}: each side must be a multiple of patch_size {p}")
        tokens = self.x_embedder(x)  # (B, D, H/p, W/p)
        b, _, rows, cols = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2) + self._pos(rows, cols, x.device).to(tokens.dtype)
        c = self.t_embedder(timestep_embedding(t, self.cfg.hidden_size).to(x.dtype))
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c).reshape(b, rows, cols, p, p, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, rows * p, cols * p)
