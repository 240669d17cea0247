"""Phase-0 codecs: the space the flow works in. The original trainer's nets and parameter names.

- `Identity`: pixel space (3 channels, spatial factor 1).
- `AutoEncoder`: conv encoder/decoder, [ResBlocks (+attention) -> downsample] per level,
  a mid block, spatial factor 2^(len(ch_mult)-1).
- `VAE`: the encoder predicts (mu, logvar); a training forward samples, eval uses mu.
- `SAE`: spherical autoencoder: latents are projected onto the sphere of radius sqrt(numel)
  (`spherify`); training perturbs them by a random angle up to `noise_angle_degrees_max` and the
  decoder always decodes a spherified code. Generative noise is spherified too.

`encode(x)` is the code the later phases see: it depends on train/eval mode exactly as the
original's does (a frozen codec is in eval mode: the VAE's mean, the SAE's clean code).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from rfp_core.config import AutoEncoderConfig, CodecNetConfig, ConfigError
from rfp_core.nets.layers import ResBlock, SelfAttention, activation, downsample, normalization, upsample


class Identity(nn.Module):
    is_identity = True
    downsample = 1
    latent_channels = 3

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z": x}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def sample_random_latent(self, shape: Sequence[int], device=None, generator=None) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator).to(device)


def _res_stack(cin: int, cout: int, n: int, cfg: AutoEncoderConfig) -> list[nn.Module]:
    return [ResBlock(cin if i == 0 else cout, cout, cfg.normalization, cfg.activation) for i in range(n)]


def _mid(ch: int, cfg: AutoEncoderConfig) -> list[nn.Module]:
    layers: list[nn.Module] = [ResBlock(ch, ch, cfg.normalization, cfg.activation)]
    if cfg.mid_attention:
        layers += [
            SelfAttention(ch, cfg.num_attention_heads, cfg.normalization),
            ResBlock(ch, ch, cfg.normalization, cfg.activation),
        ]
    return layers


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig, out_channels: int, in_channels: int = 3):
        super().__init__()
        mc = cfg.model_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, mc, 3, padding=1)]
        ch = mc
        for i, m in enumerate(cfg.ch_mult):
            layers += _res_stack(ch, mc * m, cfg.num_res_blocks, cfg)
            ch = mc * m
            if i in cfg.attention_resolutions:
                layers.append(SelfAttention(ch, cfg.num_attention_heads, cfg.normalization))
            if i < len(cfg.ch_mult) - 1:
                layers.append(downsample(cfg.downsample, ch))
        layers += _mid(ch, cfg)
        layers += [
            normalization(cfg.normalization, ch),
            activation(cfg.activation),
            nn.Conv2d(ch, out_channels, 3, padding=1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig, in_channels: int, out_channels: int = 3):
        super().__init__()
        mc = cfg.model_channels
        blocks = cfg.decoder_num_res_blocks if cfg.decoder_num_res_blocks is not None else cfg.num_res_blocks
        ch = mc * cfg.ch_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1), *_mid(ch, cfg)]
        for i in reversed(range(len(cfg.ch_mult))):
            layers += _res_stack(ch, mc * cfg.ch_mult[i], blocks, cfg)
            ch = mc * cfg.ch_mult[i]
            if i in cfg.attention_resolutions:
                layers.append(SelfAttention(ch, cfg.num_attention_heads, cfg.normalization))
            if i > 0:
                layers.append(upsample(cfg.upsample, ch))
        layers += [
            normalization(cfg.normalization, mc),
            activation(cfg.activation),
            nn.Conv2d(mc, out_channels, 3, padding=1),
            activation(cfg.output_activation),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class AutoEncoder(nn.Module):
    is_identity = False
    encoder_channels_per_latent = 1

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.latent_channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.encoder = Encoder(cfg, self.encoder_channels_per_latent * cfg.latent_channels)
        self.decoder = Decoder(cfg, cfg.latent_channels)

    def check_size(self, x: torch.Tensor) -> None:
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"codec input {tuple(x.shape[-2:])} must be a multiple of {self.downsample} per side "
                "(len(ch_mult) - 1 halvings)"
            )

    def encode_params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_size(x)
        return {"z": self.encoder(x)}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_params(x)["z"]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def sample_random_latent(self, shape: Sequence[int], device=None, generator=None) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator).to(device)


class VAE(AutoEncoder):
    encoder_channels_per_latent = 2

    def encode_params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_size(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"z": z, "mu": mu, "logvar": logvar}


class SAE(AutoEncoder):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__(cfg)
        self.eps = cfg.eps
        self.sigma_max = math.tan(math.radians(cfg.noise_angle_degrees_max))

    def spherify(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(z.square().mean(dim=(1, 2, 3), keepdim=True) + self.eps)

    def sample_random_latent(self, shape: Sequence[int], device=None, generator=None) -> torch.Tensor:
        return self.spherify(torch.randn(tuple(shape), generator=generator).to(device))

    def encode_params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_size(x)
        v = self.spherify(self.encoder(x))
        if not self.training:
            return {"z": v, "v_noisy_big": v, "v_clean": v}
        shape = (v.shape[0], 1, 1, 1)
        sigma = torch.rand(shape, device=v.device) * self.sigma_max
        sigma_small = torch.rand(shape, device=v.device) * 0.5 * sigma
        e = torch.randn_like(v)
        return {"z": self.spherify(v + sigma_small * e), "v_noisy_big": self.spherify(v + sigma * e), "v_clean": v}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.spherify(z))


def build_codec(cfg: CodecNetConfig) -> nn.Module:
    """The codec net a config names (`codec.net.type`)."""
    kinds = {"AutoEncoder": AutoEncoder, "VAE": VAE, "SAE": SAE}
    if cfg.type == "Identity":
        return Identity()
    if cfg.type in kinds:
        return kinds[cfg.type](cfg)
    raise ConfigError(
        f"codec net type {cfg.type!r} (the trainer's earlier encoder-decoder) is not supported yet; "
        'use "VAE" (same role, current trainer) or "Identity"'
    )
