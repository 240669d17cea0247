"""The codec's losses, as the original lists them in `codec.losses` (each with `id` and `weight`).

- reconstruction: `L1Loss`, `MSELoss`, `LPIPSLoss` (L1 between VGG16 feature maps conv1_2,
  conv2_2, conv3_3, conv4_3 of images mapped to [0, 1]) and this project's `StructureLoss`
  (multi-scale gradient L1 + (1 - SSIM)/2: blur-punishing like LPIPS, but needs no weights);
- regularisation: `KLLoss` on the VAE posterior, -0.5 mean(1 + logvar - mu^2 - exp(logvar));
- spherical autoencoder: `SAEPixelConsistencyLoss` (the decode of a strongly noised code must
  match the decode of a weakly noised one: LPIPS + L1 against the detached latter) and
  `SAELatentConsistencyLoss` (1 - cosine between the re-encoded noisy decode and the clean code).

VGG16 weights are read from torchvision's cache ($TORCH_HOME/hub/checkpoints); nothing downloads,
and a missing file stops before training with its name and how to drop the loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from rfp_core.config import CodecLossConfig, ConfigError

VGG_FEATURES = (3, 8, 15, 22)  # relu after conv1_2, conv2_2, conv3_3, conv4_3
_VGG: dict[str, nn.Module] = {}


class LossWeightsMissing(ConfigError):
    """A loss needs pretrained weights that are not on this machine."""


def vgg16_file() -> Path:
    url = torchvision.models.VGG16_Weights.DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def vgg16_features(device: torch.device | str = "cpu") -> nn.Module:
    """VGG16's conv layers up to conv4_3, frozen, from the local torchvision cache."""
    key = str(device)
    if key not in _VGG:
        path = vgg16_file()
        if not path.is_file():
            raise LossWeightsMissing(
                f"codec loss LPIPSLoss / SAEPixelConsistencyLoss needs the VGG16 ImageNet weights {path} "
                "(nothing is downloaded at run time): copy the file there ($TORCH_HOME moves the cache), "
                'or drop the LPIPS loss from codec.losses (use {"type": "StructureLoss"} for a weight-free '
                'perceptual term; for SAEPixelConsistencyLoss set "lpips_weight": 0)'
            )
        vgg = torchvision.models.vgg16(weights=None)
        vgg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        features = vgg.features[: VGG_FEATURES[-1] + 1].to(device).eval().requires_grad_(False)
        _VGG[key] = features
    return _VGG[key]


def lpips(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the four feature maps of the L1 distance, images in [-1, 1]."""
    features = vgg16_features(x.device)
    a, b, total = (x + 1) / 2, (y + 1) / 2, x.new_zeros(())
    for i, layer in enumerate(features):
        a, b = layer(a), layer(b)
        if i in VGG_FEATURES:
            total = total + F.l1_loss(a, b)
    return total


def _ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM with a 3x3 uniform window, inputs in [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    pool = lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()


def structure_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """Multi-scale gradient L1 + (1 - SSIM)/2 between images in [-1, 1]; 0 iff equal."""
    total, used = x.new_zeros(()), 0
    for s in range(scales):
        if s:
            if min(x.shape[-2:]) < 8:
                break
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        grad = sum((torch.diff(x, dim=d) - torch.diff(y, dim=d)).abs().mean() for d in (-1, -2))
        total = total + grad + (1 - _ssim((x + 1) / 2, (y + 1) / 2)) / 2
        used += 1
    return total / used


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()


def check_losses(losses: list[CodecLossConfig], codec_type: str) -> None:
    """Refuse, before any training, a loss the codec cannot feed or whose weights are missing."""
    for loss in losses:
        if loss.type == "KLLoss" and codec_type != "VAE":
            raise ConfigError(
                f"codec loss KLLoss ('{loss.id}') needs a VAE codec (mu, logvar); this codec is {codec_type}"
            )
        if loss.type.startswith("SAE") and codec_type != "SAE":
            raise ConfigError(f"codec loss {loss.type} ('{loss.id}') needs an SAE codec; this codec is {codec_type}")
        needs_vgg = loss.type == "LPIPSLoss" or (loss.type == "SAEPixelConsistencyLoss" and loss.lpips_weight)
        if needs_vgg:
            vgg16_features("cpu")


def codec_losses(
    codec: nn.Module, x: torch.Tensor, losses: list[CodecLossConfig]
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(weighted total, {id: unweighted value}, reconstruction) for one batch, codec in train mode."""
    params = codec.encode_params(x)
    x_hat = codec.decode(params["z"])
    noisy = None
    total, parts = x.new_zeros(()), {}
    for loss in losses:
        if loss.type in ("L1Loss", "MSELoss", "LPIPSLoss", "StructureLoss"):
            fn = {"L1Loss": F.l1_loss, "MSELoss": F.mse_loss, "LPIPSLoss": lpips, "StructureLoss": structure_loss}[
                loss.type
            ]
            value = fn(x_hat, x)
        elif loss.type == "KLLoss":
            mu, logvar = params["mu"], params["logvar"]
            value = -0.5 * torch.mean(1.0 + logvar - mu.pow(2) - logvar.exp())
        else:  # SAE consistency: decode the strongly noised code once, share it between both losses
            if noisy is None:
                noisy = codec.decode(params["v_noisy_big"])
            if loss.type == "SAEPixelConsistencyLoss":
                target = x_hat.detach()
                value = loss.recon_weight * F.l1_loss(noisy, target)
                if loss.lpips_weight:
                    value = value + loss.lpips_weight * lpips(noisy, target)
            else:
                value = _cosine_distance(codec.encoder(noisy), params["v_clean"])
        parts[loss.id] = float(value.detach())
        total = total + loss.weight * value
    return total, parts, x_hat
