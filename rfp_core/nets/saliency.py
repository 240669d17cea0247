"""Saliency network h(x): a torchvision ResNet, global pool, `latent_proj` (= h(x)), `classifier`.

The Jacobian of h is the saliency map of the velocity loss (method.md). Pixel input is in
[-1, 1] and gets ImageNet normalisation inside the net; latent (codec) input swaps the 7x7/2
stem and max-pool for one 3x3 stride-1 conv, since a latent is already small and not an RGB image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torchvision
from torch import nn

from rfp_core.config import ConfigError, SaliencyNetConfig
from rfp_core.nets.frozen import FrozenSaliency

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
}


class PretrainedWeightsMissing(ConfigError):
    """`pretrained: true` but the ImageNet weights file is not on this machine (nothing downloads)."""


class SaliencyNet(nn.Module):
    def __init__(self, cfg: SaliencyNetConfig, in_channels: int = 3, latent_input: bool = False):
        super().__init__()
        if not latent_input and in_channels != 3:
            raise ValueError(f"pixel input must have 3 channels (ImageNet stem), got {in_channels}; use latent_input=True for codec latents")
        self.cfg = cfg
        self.latent_input = latent_input
        backbone = getattr(torchvision.models, cfg.backbone)(weights=None)
        if latent_input:
            backbone.conv1 = nn.Conv2d(in_channels, backbone.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        feature_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()  # the backbone now ends in the global average pool
        self.backbone = backbone
        self.latent_proj = nn.Linear(feature_dim, cfg.latent_channels)
        self.classifier = nn.Linear(cfg.latent_channels, cfg.num_classes)
        # [-1, 1] -> ImageNet statistics folded into one affine map: x * scale + shift
        mean, std = torch.tensor(_IMAGENET_MEAN), torch.tensor(_IMAGENET_STD)
        self.register_buffer("in_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        if cfg.pretrained:
            load_pretrained_backbone(self, cfg)

    def h(self, x: torch.Tensor) -> torch.Tensor:
        """The style feature h(x), shape (B, latent_channels)."""
        if not self.latent_input:
            x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        return self.latent_proj(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two logits: domain 0 vs domain 1."""
        return self.classifier(self.h(x))

    def frozen_h(self) -> FrozenSaliency:
        """A frozen copy of the eval-mode h for the velocity loss: BN folded into the convs and a
        batched primal+tangent `jvp` (nets/frozen.py). `self` is left untouched."""
        return FrozenSaliency(self)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.latent_proj.parameters()
        yield from self.classifier.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters()

    def set_backbone_trainable(self, flag: bool) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(flag)


def pretrained_weights_file(backbone: str) -> tuple[Path, str]:
    """Where torchvision keeps the ImageNet weights for `backbone`, and the URL they come from."""
    url = getattr(torchvision.models, _WEIGHTS[backbone]).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name, url


def load_pretrained_backbone(net: SaliencyNet, cfg: SaliencyNetConfig) -> Path:
    """Load ImageNet weights into `net.backbone` from `cfg.pretrained_path` or torchvision's cache.

    Never downloads. The 7x7 stem is skipped for latent input (it was replaced) and `fc` is not
    used. Returns the file that was loaded.
    """
    cached, url = pretrained_weights_file(cfg.backbone)
    path = Path(cfg.pretrained_path).expanduser() if cfg.pretrained_path else cached
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"saliency net: 'pretrained' is true but the {cfg.backbone} ImageNet weights file {path} does not exist "
            "(nothing is downloaded at run time). Either place the file there (download it from "
            f"{url} on a machine with internet and copy it; $TORCH_HOME moves torchvision's cache), "
            "point 'pretrained_path' in the saliency net config at a copy of it, or set "
            '"pretrained": false in the saliency net config to train the backbone from scratch.'
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or pickled-object files
        raise PretrainedWeightsMissing(f"saliency net: cannot load pretrained weights {path}: {exc}; replace the file or set \"pretrained\": false") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if net.latent_input:
        state = {k: v for k, v in state.items() if not k.startswith("conv1.")}
    missing, unexpected = net.backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (net.latent_input and k.startswith("conv1."))]
    if missing or unexpected:
        raise PretrainedWeightsMissing(
            f"saliency net: {path} does not match a torchvision {cfg.backbone} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); use the file from {url} or set \"pretrained\": false"
        )
    return path
