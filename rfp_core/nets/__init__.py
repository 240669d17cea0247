"""The nets: velocity (UNet, DiT), saliency ResNet, codecs. `build_velocity_net` picks by config type."""

from __future__ import annotations

from torch import nn


def build_velocity_net(cfg, in_channels: int = 3) -> nn.Module:
    """The velocity net `velocity.net` names ("UNet" or "DiT"), mapping in_channels to in_channels."""
    from rfp_core.nets.dit import DiT
    from rfp_core.nets.unet import UNet

    return {"UNet": UNet, "DiT": DiT}[cfg.type](cfg, in_channels=in_channels)
