"""Evaluation metrics as pure functions: realism (FD, KID), content (mask IoU, cosine), cycle.

Features are (N, D) arrays; images are (N, 3, H, W) tensors in [-1, 1]; masks are bool (N, H, W).
Straightness lives with the samplers, in `rfp_core.flow.rf.straightness`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import linalg

ArrayLike = np.ndarray | torch.Tensor


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _features(x: ArrayLike, name: str) -> np.ndarray:
    f = _np(x)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: expected features of shape (N >= 2, D), got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return f


# ----------------------------------------------------------------------------------------
# realism


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the Fréchet distance of two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    bad = not np.isfinite(covmean).all() or (np.iscomplexobj(covmean) and np.abs(covmean.imag).max() > 1e-3)
    if bad:
        # few samples in many dimensions give singular covariances: nudge both off singularity
        offset = np.eye(sigma1.shape[0]) * eps * max(1.0, np.trace(sigma1) / len(sigma1))
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # round-off leaves tiny imaginary parts on a real result
    covmean = np.real(covmean)
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's)."""
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), eps)


def kid(feats_a: ArrayLike, feats_b: ArrayLike, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD² with the kernel (x·y / D + 1)³, averaged over subsets.

    Unbiased, so it is ≈ 0 (and may dip just below 0) for sets from one distribution.
    """
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    d = a.shape[1]
    m = min(len(a), len(b), subset_size)
    if m == len(a) == len(b):
        subsets = 1  # every "subset" is the whole of both sets: one evaluation says it all
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        # off-diagonal means only: the diagonal k(x, x) is what makes the plain estimate biased
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2.0 * kxy.mean()
    return float(total / subsets)


# ----------------------------------------------------------------------------------------
# content


def _masks(x: ArrayLike | Sequence, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    m = np.asarray(x)
    if m.dtype != bool:
        m = m > (127 if m.dtype == np.uint8 else 0.5)
    if m.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a mask (H, W) or a batch (N, H, W), got shape {m.shape}")
    return m


def mask_ious(pred_mask: ArrayLike, true_mask: ArrayLike) -> np.ndarray:
    """Per-mask intersection over union, (N,). Two empty masks agree perfectly (IoU 1)."""
    p, t = _masks(pred_mask, "pred_mask"), _masks(true_mask, "true_mask")
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    if p.ndim == 2:
        p, t = p[None], t[None]
    inter = (p & t).sum(axis=(1, 2))
    union = (p | t).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mask_iou(pred_mask: ArrayLike, true_mask: ArrayLike) -> float:
    """IoU of one mask pair, or the mean IoU over a batch."""
    return float(mask_ious(pred_mask, true_mask).mean())


def foreground_mask(images: torch.Tensor, background: Sequence[float], threshold: float = 0.4) -> np.ndarray:
    """Pixels whose colour is farther than `threshold` (Euclidean, [-1, 1] units) from the background.

    This is how the demo finds the shape in an output: its background is one known colour.
    """
    x = images.detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
    bg = torch.tensor(list(background), dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - bg).pow(2).sum(1).sqrt() > threshold).numpy()


def cosine_similarity(a: ArrayLike, b: ArrayLike) -> float:
    """Mean row-wise cosine similarity of two (N, D) embedding sets (row i against row i)."""
    x, y = _np(a), _np(b)
    if x.shape != y.shape:
        raise ValueError(f"embedding shapes differ: {x.shape} vs {y.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return float((x * y).sum(1).mean())


def cycle_error(x: torch.Tensor, x_back: torch.Tensor) -> float:
    """Mean absolute difference, in [-1, 1] units, between inputs and their round trip."""
    if x.shape != x_back.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_back.shape)}")
    return float((x.detach().float() - x_back.detach().float()).abs().mean())


def edge_maps(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) Sobel gradient magnitude of each image's luminance (edge-padded borders)."""
    x = images.detach().float().cpu()
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    gray = torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx = torch.nn.functional.conv2d(gray, kx)
    gy = torch.nn.functional.conv2d(gray, kx.transpose(2, 3))
    return torch.hypot(gx, gy)[:, 0]


def edge_agreements(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-pair Pearson correlation of the two images' edge maps, (N,): 1 = the same edges
    (whatever the colours), ~0 = unrelated. A flat image has no edges to agree with: 0."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    ea, eb = edge_maps(a).flatten(1).double(), edge_maps(b).flatten(1).double()
    ea, eb = ea - ea.mean(1, keepdim=True), eb - eb.mean(1, keepdim=True)
    denom = ea.norm(dim=1) * eb.norm(dim=1)
    corr = torch.where(denom > 1e-9, (ea * eb).sum(1) / denom.clamp_min(1e-12), torch.zeros_like(denom))
    return corr.numpy()


def stripe_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute vertical pixel difference per image, (N,): high for striped fills, ~0 for flat."""
    x = images.detach().float()
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))


__all__ = [
    "frechet_distance",
    "frechet_distance_from_stats",
    "kid",
    "mask_iou",
    "mask_ious",
    "foreground_mask",
    "cosine_similarity",
    "cycle_error",
    "stripe_energy",
    "edge_maps",
    "edge_agreements",
]
