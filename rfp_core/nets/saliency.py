"""Saliency network h(x): the original trainer's `ResNetSaliencyNet`, same layout and parameter names.

`backbone` is an nn.Sequential of a torchvision ResNet's stem and four layers; global average
pool; `latent_proj` (its output is h(x), the style feature whose Jacobian weights the velocity
loss); `classifier` -> 2 logits. Pixel input (3 channels, in [-1, 1]) is mapped to ImageNet
statistics with the `imagenet_mean` / `imagenet_std` buffers. Latent (codec) input replaces the
7x7 stride-2 stem and the max-pool with one 3x3 stride-1 conv: a latent is small and not an RGB image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torchvision
from torch import nn

from rfp_core.config import ConfigError, SaliencyNetConfig
from rfp_core.media.images import IMAGENET_MEAN, IMAGENET_STD
from rfp_core.nets.frozen import FrozenSaliency

_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
}
# torchvision names -> index in `backbone` (pixel path: conv1 bn1 relu maxpool layer1..4)
_PIXEL_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
_LATENT_INDEX = {"bn1": 1, "layer1": 3, "layer2": 4, "layer3": 5, "layer4": 6}


class PretrainedWeightsMissing(ConfigError):
    """`pretrained: true` but the ImageNet weights file is not on this machine (nothing downloads)."""


class SaliencyNet(nn.Module):
    def __init__(self, cfg: SaliencyNetConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.latent_input = in_channels != 3
        base = getattr(torchvision.models, cfg.backbone)(weights=None)
        if self.latent_input:
            stem = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1)
            nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
            layers = [stem, base.bn1, base.relu]
        else:
            layers = [base.conv1, base.bn1, base.relu, base.maxpool]
        self.backbone = nn.Sequential(*layers, base.layer1, base.layer2, base.layer3, base.layer4)
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.latent_proj = nn.Linear(base.fc.in_features, cfg.latent_channels)
        self.classifier = nn.Linear(cfg.latent_channels, cfg.num_classes)
        if cfg.pretrained:
            load_pretrained_backbone(self, cfg)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.latent_input:
            return x
        return ((x + 1.0) / 2.0 - self.imagenet_mean.to(x.dtype)) / self.imagenet_std.to(x.dtype)

    def h(self, x: torch.Tensor) -> torch.Tensor:
        """The style feature h(x), shape (B, latent_channels) (the original's `get_latent`)."""
        return self.latent_proj(self.pool(self.backbone(self.normalize_input(x))).flatten(1))

    get_latent = h

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


def _to_backbone_keys(state: dict, latent_input: bool) -> dict:
    """torchvision ResNet keys (`layer1.0.conv1.weight`) -> `backbone` indices (`4.0.conv1.weight`)."""
    index = _LATENT_INDEX if latent_input else _PIXEL_INDEX
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in index:
            out[f"{index[head]}.{rest}"] = value
    return out


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
        raise PretrainedWeightsMissing(
            f'saliency net: cannot load pretrained weights {path}: {exc}; replace the file or set "pretrained": false'
        ) from None
    state = _to_backbone_keys(state, net.latent_input)
    missing, unexpected = net.backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (net.latent_input and k.startswith("0."))]
    if missing or unexpected:
        raise PretrainedWeightsMissing(
            f"saliency net: {path} does not match a torchvision {cfg.backbone} "
            f'(missing {missing[:3]}, unexpected {unexpected[:3]}); use the file from {url} or set "pretrained": false'
        )
    return path
