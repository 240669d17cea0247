"""Phase 0 codec: maps images to the space the flow works in. `Identity` = pixel space."""

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

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def build_codec(cfg: CodecNetConfig) -> nn.Module:
    if cfg.type == "Identity":
        return IdentityCodec()
    raise NotImplementedError("the VAE codec arrives with the structure/codec issue")
