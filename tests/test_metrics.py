"""Metrics against known answers: closed-form Fréchet distances, KID signs, constructed IoUs."""

import numpy as np
import pytest
import torch

from rfp_core.evaluate.metrics import (
    cosine_similarity,
    cycle_error,
    foreground_mask,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    mask_iou,
    mask_ious,
)


def _with_exact_stats(rng, n, mu, cov):
    """n samples whose sample mean and (ddof=1) covariance are exactly mu and cov."""
    z = rng.normal(size=(n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten
    return z @ np.linalg.cholesky(cov).T + mu


def test_frechet_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 16))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_of_a_small_singular_set_with_itself_is_zero():
    # fewer samples than dimensions: singular covariance, the case the evaluation meets
    feats = np.random.default_rng(1).normal(size=(12, 64))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-3)


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = _with_exact_stats(rng, 500, mu1, np.diag(s1))
    b = _with_exact_stats(rng, 700, mu2, np.diag(s2))
    # diagonal case: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2 = 5 + (4 + 1 + 0)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert expected == pytest.approx(10.0)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_matches_closed_form_for_full_covariances():
    rng = np.random.default_rng(3)
    a_ = rng.normal(size=(4, 4))
    b_ = rng.normal(size=(4, 4))
    c1, c2 = a_ @ a_.T + 0.1 * np.eye(4), b_ @ b_.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    # the symmetric form tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), computed by eigendecomposition
    w, v = np.linalg.eigh(c1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ c2 @ r1)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(inner).sum()
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-6)
    feats = frechet_distance(_with_exact_stats(rng, 300, mu1, c1), _with_exact_stats(rng, 300, mu2, c2))
    assert feats == pytest.approx(expected, rel=1e-6)


def test_frechet_rejects_bad_features():
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


def test_kid_is_about_zero_for_one_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(400, 16))
    same = rng.normal(size=(400, 16))
    shifted = rng.normal(size=(400, 16)) + 0.5
    k_ident = kid(a, a, subsets=20, subset_size=200)
    k_same = kid(a, same, subsets=20, subset_size=200)
    k_shift = kid(a, shifted, subsets=20, subset_size=200)
    # unbiased estimator: ~0 within one distribution (identical sets sit O(1/m) below 0)
    assert abs(k_ident) < 0.05 and abs(k_same) < 0.05
    assert k_shift > 0.5
    assert k_shift > 20 * max(abs(k_ident), abs(k_same))


def test_kid_grows_with_the_shift():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 8))
    values = [kid(a, rng.normal(size=(300, 8)) + s, subsets=10, subset_size=150) for s in (0.25, 0.5, 1.0)]
    assert values[0] < values[1] < values[2]


def test_mask_iou_on_constructed_masks():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True  # left half
    b[:, :5] = True
    assert mask_iou(a, b) == 1.0
    b[:] = False
    b[:, 5:] = True  # right half: disjoint
    assert mask_iou(a, b) == 0.0
    b[:] = False
    b[:, :] = True  # whole image: 50 / 100
    assert mask_iou(a, b) == pytest.approx(0.5)
    b[:] = False
    b[:, 2:7] = True  # overlap columns 2-4 (30 px), union columns 0-6 (70 px)
    assert mask_iou(a, b) == pytest.approx(3 / 7)
    # two empty masks agree perfectly
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_mask_iou_batch_mean_and_uint8_masks():
    a = np.zeros((2, 8, 8), np.uint8)
    b = np.zeros((2, 8, 8), np.uint8)
    a[0, :4], b[0, :4] = 255, 255  # IoU 1
    a[1, :4], b[1, :2] = 255, 255  # IoU 16 / 32
    assert mask_ious(a, b) == pytest.approx([1.0, 0.5])
    assert mask_iou(a, b) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, b[:, :4])


def test_foreground_mask_finds_pixels_away_from_the_background():
    bg = (0.0, 0.0, 0.0)
    x = torch.zeros(1, 3, 6, 6)
    x[0, 0, 1:3, 1:4] = 0.9  # a red patch
    x[0, :, 5, 5] = 0.1  # a faint drift, below the threshold
    m = foreground_mask(x, bg, threshold=0.4)
    assert m.shape == (1, 6, 6) and m.sum() == 6 and m[0, 1:3, 1:4].all()


def test_cycle_error_and_cosine():
    x = torch.zeros(2, 3, 4, 4)
    assert cycle_error(x, x) == 0.0
    assert cycle_error(x, x + 0.25) == pytest.approx(0.25)
    e = np.eye(3)
    assert cosine_similarity(e, e) == pytest.approx(1.0)
    assert cosine_similarity(e, -e) == pytest.approx(-1.0)
    assert cosine_similarity(e, np.roll(e, 1, axis=1)) == pytest.approx(0.0)


def test_straightness_is_zero_for_a_constant_velocity_field():
    flow = pytest.importorskip("rfp_core.flow.rf")
    c = torch.randn(1, 3, 8, 8)
    z0 = torch.randn(4, 3, 8, 8)
    v = lambda x, t: c.expand_as(x)  # noqa: E731 - every path is the straight line z0 + t c
    for sampler in ("euler", "heun", "rk4"):
        assert float(flow.straightness(v, z0, steps=8, sampler=sampler)) == pytest.approx(0.0, abs=1e-10)
    # a curved field is not straight
    assert float(flow.straightness(lambda x, t: x, z0, steps=8, sampler="euler")) > 0.01
