"""Training augmentations by config name (`saliency.augmentations`, `codec.augmentations`)."""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2


def build_augment(names: list[str]) -> v2.Compose | None:
    """torchvision v2 augmentations by config name, acting on one (3, S, S) image in [0, 1]."""
    table = {
        # mild: a strong hue shift could erase exactly the colour difference between domains
        "color_jitter": v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        "grayscale": v2.RandomGrayscale(p=0.1),
        "hflip": v2.RandomHorizontalFlip(),
        "random_erasing": v2.RandomErasing(p=0.25, scale=(0.02, 0.15), value=0.5),
        "gaussian_blur": v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.5))], p=0.2),
    }
    ops = [table[n] for n in names]
    return v2.Compose(ops) if ops else None


def augment_batch(x: torch.Tensor, augment: v2.Compose | None) -> torch.Tensor:
    """Per-image random augmentation of a [-1, 1] batch (v2 draws one set of params per call)."""
    if augment is None:
        return x
    x01 = (x + 1) / 2
    return torch.stack([augment(img) for img in x01]).clamp(0, 1) * 2 - 1


def augment_item(augment: v2.Compose | None) -> Callable[[dict], dict] | None:
    """Augmentation per item, in the loader: its draws are then seeded by the sample's position."""
    if augment is None:
        return None
    return lambda item: {**item, **{k: augment_batch(item[k][None], augment)[0] for k in ("domain_0", "domain_1")}}
