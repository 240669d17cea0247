"""Phase 0 codec: maps images to the space the flow works in. `Identity` = pixel space.

`VAE`: a small KL autoencoder in the shape of Stable Diffusion's (ResNet blocks, GroupNorm,
SiLU; stride-2 conv down, nearest-neighbour up), `len(ch_mult) - 1` halvings. `encode(x)`
returns the posterior mean, standardised per channel (shift and scale measured on the
training data after training, kept as buffers in the state dict), so a latent has roughly
zero mean and unit variance: generative noise N(0, I) then lives at the data's scale.
"""

from __future__ import annotations

import torch
from torch import nn

from rfp_core.config import CodecNetConfig


class IdentityCodec(nn.Module):
    is_identity = True
    downsample = 1

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.latent_channels = in_channels

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def _norm(ch: int) -> nn.GroupNorm:
    # GroupNorm32 where the width allows it; tiny test nets get the largest group count that divides
    return nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, mc: int, ch_mult: list[int], out_channels: int):
        super().__init__()
        widths = [mc * m for m in ch_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        cin = widths[0]
        for i, w in enumerate(widths):
            layers.append(ResBlock(cin, w))
            cin = w
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        layers += [ResBlock(cin, cin), _norm(cin), nn.SiLU(), nn.Conv2d(cin, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, latent_channels: int, mc: int, ch_mult: list[int], out_channels: int):
        super().__init__()
        widths = [mc * m for m in reversed(ch_mult)]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, widths[0], 3, padding=1), ResBlock(widths[0], widths[0])]
        cin = widths[0]
        for i, w in enumerate(widths):
            layers.append(ResBlock(cin, w))
            cin = w
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w, 3, padding=1)]
        layers += [_norm(cin), nn.SiLU(), nn.Conv2d(cin, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VAE(nn.Module):
    is_identity = False

    def __init__(self, cfg: CodecNetConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.latent_channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.encoder = Encoder(in_channels, cfg.model_channels, cfg.ch_mult, 2 * cfg.latent_channels)
        self.decoder = Decoder(cfg.latent_channels, cfg.model_channels, cfg.ch_mult, in_channels)
        # raw latent -> standardised latent: (raw - shift) * scale; identity until fitted
        self.register_buffer("latent_shift", torch.zeros(1, cfg.latent_channels, 1, 1))
        self.register_buffer("latent_scale", torch.ones(1, cfg.latent_channels, 1, 1))

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(f"VAE input {tuple(x.shape[-2:])} must be a multiple of {self.downsample} per side (len(ch_mult) - 1 halvings)")

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw posterior (mean, logvar), each (B, latent_channels, S/d, S/d)."""
        self._check(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Standardised latent: the posterior mean, or a posterior sample with `sample=True`."""
        mean, logvar = self.encode_dist(x)
        raw = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return (raw - self.latent_shift) * self.latent_scale

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return self.decoder(raw)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image in (about) [-1, 1] from a standardised latent."""
        return self.decoder(z / self.latent_scale + self.latent_shift)

    @torch.no_grad()
    def fit_latent_stats(self, raw_means: torch.Tensor) -> None:
        """Set the per-channel shift and scale from raw posterior means (N, C, h, w)."""
        mean = raw_means.mean(dim=(0, 2, 3), keepdim=True)
        std = raw_means.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-4)
        self.latent_shift.copy_(mean)
        self.latent_scale.copy_(1.0 / std)


def build_codec(cfg: CodecNetConfig) -> nn.Module:
    if cfg.type == "Identity":
        return IdentityCodec()
    if cfg.type == "VAE":
        return VAE(cfg)
    raise ValueError(f"unknown codec type {cfg.type!r}; use 'Identity' or 'VAE'")
