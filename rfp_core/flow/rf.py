"""Rectified-flow maths: timesteps, interpolation, the losses, ODE samplers, straightness.

X_t = t*X1 + (1-t)*X0 and the target velocity is X1 - X0 (docs/METHOD.md). Translation trains v with
the saliency-weighted loss E ||J_h(X_t) (X1 - X0 - v)||^2; generative mode with plain MSE.
"""

from __future__ import annotations

import zlib
from typing import Callable, Literal, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, Tensor], Tensor]
Sampler = Literal["euler", "heun", "rk4"]

_NFE_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}


# ----------------------------------------------------------------------------------------
# Training-time pieces


def sample_timesteps(
    n: int,
    kind: Literal["uniform", "logit-normal"],
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """n training times in [0, 1]: uniform, or logit-normal (sigmoid of N(0, 1), denser mid-path)."""
    gen_device = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    elif kind == "logit-normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device))
    else:
        raise ValueError(f"timestep sampling must be 'uniform' or 'logit-normal', got {kind!r}")
    return t.to(device) if device is not None else t


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """X_t = t*x1 + (1-t)*x0, with t of shape (B,) broadcast over the other dims."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return t * x1 + (1 - t) * x0


def lowpass(eps: Tensor, period: float | None) -> Tensor:
    """`eps` with every spatial frequency finer than `period` pixels removed (FFT), rescaled so that
    white noise keeps unit variance (`velocity.source_noise_lowpass`; None: `eps` as it is)."""
    if period is None:
        return eps
    h, w = eps.shape[-2:]
    fy = torch.fft.fftfreq(h).view(-1, 1)
    kept = torch.hypot(fy, torch.fft.rfftfreq(w).view(1, -1)) <= 1 / period
    share = (torch.hypot(fy, torch.fft.fftfreq(w).view(1, -1)) <= 1 / period).float().mean()  # of the power
    out = torch.fft.irfft2(torch.fft.rfft2(eps.float()) * kept, s=(h, w))
    return (out / share.sqrt()).to(eps.dtype)


def source_noise(
    z0: Tensor, sigma: float, seed: int = 0, shared: bool = False, lowpass_period: float | None = None
) -> Tensor:
    """sigma * eps for translation's start points at inference: each point's eps from a generator
    seeded by its own bytes (and `seed`), so an image gets the same draw in any batch and two images
    do not share one; `shared`: one eps for every point and every call (a video's frames keep their
    texture from frame to frame)."""
    if shared:
        eps = torch.randn((1, *z0.shape[1:]), generator=torch.Generator().manual_seed(seed))
        eps = lowpass(eps, lowpass_period).expand_as(z0)
    else:
        seeds = [zlib.crc32(z.float().cpu().numpy().tobytes()) + seed for z in z0]
        draws = [torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(k)) for k in seeds]
        eps = lowpass(torch.stack(draws), lowpass_period) if draws else torch.zeros_like(z0)
    return sigma * eps.to(z0.device, z0.dtype)


def velocity_mse_loss(v_pred: Tensor, target: Tensor) -> Tensor:
    """Plain rectified-flow loss (generative mode, and the MSE ablation)."""
    return F.mse_loss(v_pred.float(), target.float())


def saliency_weighted_loss(h: Callable[[Tensor], Tensor], x_t: Tensor, target: Tensor, v_pred: Tensor) -> Tensor:
    """mean(||J_h(x_t) (target - v_pred)||^2), with exact gradients and no double backward.

    h is frozen and x_t is fixed, so J = J_h(x_t) is a constant matrix and, with e = target - v,
    the gradient w.r.t. v is -(2/N) J^T J e (N = number of elements of J e). We compute it with
    one forward-mode pass, u = J e, that also records h(x_t)'s autograd graph, then one reverse
    pass through that same primal graph, g = J^T u: the vjp without re-running h's forward.
    The returned scalar has value mean(u^2) and, via a linear surrogate in v_pred, gradient
    -(2/N) g w.r.t. v_pred, so callers just call `.backward()` (gradient accumulation and loss
    scaling work as usual). Only the input gradient of h is computed: its parameters never
    receive `.grad`, even if they require grad.

    Pass `saliency_net.frozen_h()` as h: it has a `jvp(x, e)` that folds BN and pushes primal and
    tangent through each conv together (3-4x faster than the reference on ResNet-18 at 32-64 px).
    Any other callable works through the dual-tensor engine behind `torch.func.jvp`, used
    directly (it keeps the primal graph and skips functorch's per-op wrapping), e.g. `net.h`.

    Requirements: h must be deterministic and free of in-place state updates, so its BatchNorm
    layers must be in eval mode (forward-mode AD through train-mode BN would also update running
    stats); put h in `.eval()`. Forward-mode AD does not cover the flash / memory-efficient SDPA
    kernels, so attention inside h (if any) must use the math path. Under bf16 autocast the
    saliency part runs in float32.
    """
    with torch.autocast(device_type=x_t.device.type, enabled=False):
        dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        x = x_t.detach().to(dtype).requires_grad_(True)
        e = target.detach().to(dtype) - v_pred.detach().to(dtype)
        with torch.enable_grad():
            y, u = _value_and_jvp(h, x, e)
            u = u.detach()  # dual-tensor tangents may carry a graph; we only need their values
        (g,) = torch.autograd.grad(y, x, grad_outputs=u)
        n = u.numel()
        value = u.pow(2).mean()
        surrogate = (v_pred.to(dtype) * (g * (-2.0 / n))).sum()
    return surrogate - surrogate.detach() + value


def _value_and_jvp(h: Callable[[Tensor], Tensor], x: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """(h(x) with its autograd graph to x, J_h(x) e)."""
    jvp = getattr(h, "jvp", None)
    if jvp is not None:  # e.g. FrozenSaliency: one batched primal+tangent pass
        return jvp(x, e)
    with fwAD.dual_level():
        return fwAD.unpack_dual(h(fwAD.make_dual(x, e)))


def saliency_weighted_loss_func(h: Callable[[Tensor], Tensor], x_t: Tensor, target: Tensor, v_pred: Tensor) -> Tensor:
    """The same loss with `torch.func.jvp` then a separate `torch.func.vjp` (which re-runs h's
    forward). The textbook form, kept as a cross-check in the tests; `saliency_weighted_loss` is faster."""
    with torch.autocast(device_type=x_t.device.type, enabled=False):
        dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        x = x_t.detach().to(dtype)
        e = target.detach().to(dtype) - v_pred.detach().to(dtype)
        with torch.no_grad():
            _, u = torch.func.jvp(h, (x,), (e,))
            _, vjp_fn = torch.func.vjp(h, x)
            (g,) = vjp_fn(u)
        n = u.numel()
        value = u.pow(2).mean()
        surrogate = (v_pred.to(dtype) * (g * (-2.0 / n))).sum()
    return surrogate - surrogate.detach() + value


class LossTerms(NamedTuple):
    """The anchored loss and its two terms: `total` = `saliency` + mse_weight x `mse`.

    `total` carries the gradient; `saliency` and `mse` are detached values for logging (`mse` is
    the plain, unweighted MSE, measured even when the anchor's weight is 0)."""

    total: Tensor
    saliency: Tensor
    mse: Tensor


def anchored_saliency_loss_terms(
    h: Callable[[Tensor], Tensor],
    x_t: Tensor,
    target: Tensor,
    v_pred: Tensor,
    mse_weight: float | Callable[[Tensor, Tensor], Tensor],
) -> LossTerms:
    """`anchored_saliency_loss` with its two terms apart, so a trainer can log what each does.

    `mse_weight` may be a function of the two detached terms that returns the weight (the relative
    anchor, `train/anchor.py`)."""
    sal = saliency_weighted_loss(h, x_t, target, v_pred)
    if mse_weight:
        mse = velocity_mse_loss(v_pred, target)
        w = mse_weight(sal.detach(), mse.detach()) if callable(mse_weight) else mse_weight
        return LossTerms(sal + w * mse, sal.detach(), mse.detach())
    # weight 0: the MSE is only watched, so it must add nothing to the graph
    with torch.no_grad():
        mse = velocity_mse_loss(v_pred, target)
    return LossTerms(sal, sal.detach(), mse)


def anchored_saliency_loss(
    h: Callable[[Tensor], Tensor], x_t: Tensor, target: Tensor, v_pred: Tensor, mse_weight: float
) -> Tensor:
    """The saliency-weighted loss plus `mse_weight` x plain MSE (`velocity.mse_weight`).

    h's Jacobian has rank <= latent_channels and is spread over the whole image, so the saliency
    loss alone lets the velocity wander off along everything else (docs/METHOD.md's colour cast); a
    small MSE term anchors those coordinates to the straight-line target.
    """
    return anchored_saliency_loss_terms(h, x_t, target, v_pred, mse_weight).total


def reference_saliency_loss(h: Callable[[Tensor], Tensor], x_t: Tensor, target: Tensor, v_pred: Tensor) -> Tensor:
    """The original trainer's formulation: double-backward jvp with create_graph, mean square."""
    _, u = torch.autograd.functional.jvp(h, (x_t,), (target - v_pred,), create_graph=True)
    return u.pow(2).mean()


# ----------------------------------------------------------------------------------------
# Sampling


def nfe(sampler: Sampler, steps: int) -> int:
    """Velocity evaluations needed by `integrate(..., steps, sampler)`."""
    return _NFE_PER_STEP[sampler] * steps


def _step(v_fn: VelocityFn, x: Tensor, t0: float, t1: float, sampler: Sampler) -> tuple[Tensor, Tensor]:
    """One step from t0 to t1; returns (x at t1, v(x, t0))."""
    dt = t1 - t0
    tb = lambda t: torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)  # noqa: E731
    k1 = v_fn(x, tb(t0))
    if sampler == "euler":
        return x + dt * k1, k1
    if sampler == "heun":
        k2 = v_fn(x + dt * k1, tb(t1))
        return x + 0.5 * dt * (k1 + k2), k1
    if sampler == "rk4":
        tm = t0 + 0.5 * dt
        k2 = v_fn(x + 0.5 * dt * k1, tb(tm))
        k3 = v_fn(x + 0.5 * dt * k2, tb(tm))
        k4 = v_fn(x + dt * k3, tb(t1))
        return x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4), k1
    raise ValueError(f"sampler must be one of {sorted(_NFE_PER_STEP)}, got {sampler!r}")


def _grid(steps: int, reverse: bool) -> list[float]:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = [i / steps for i in range(steps + 1)]
    return ts[::-1] if reverse else ts


@torch.no_grad()
def integrate(v_fn: VelocityFn, x: Tensor, steps: int, sampler: Sampler = "euler", reverse: bool = False) -> Tensor:
    """Solve dZ = v(Z, t) dt on a uniform grid, t 0 -> 1 (domain 0 -> 1) or 1 -> 0 with `reverse`.

    `v_fn(x, t)` gets t of shape (B,). Cost: `nfe(sampler, steps)` calls of v_fn.
    """
    ts = _grid(steps, reverse)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x, _ = _step(v_fn, x, t0, t1, sampler)
    return x


@torch.no_grad()
def straightness(v_fn: VelocityFn, z0: Tensor, steps: int, sampler: Sampler = "euler") -> float:
    """S = integral_0^1 E ||(Z1 - Z0) - v(Z_t, t)||^2 dt, per element (docs/METHOD.md; 0 = straight).

    The path Z_t is solved from z0 with `integrate`'s grid and sampler; the integral is the left
    Riemann sum over the grid points t_i = i/steps (i < steps) of the mean over all elements of
    ((Z1 - Z0) - v(Z_{t_i}, t_i))^2, where Z1 is the end of the same solve.
    """
    ts = _grid(steps, reverse=False)
    x, velocities = z0, []
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x, v = _step(v_fn, x, t0, t1, sampler)
        velocities.append(v)
    displacement = x - z0
    return float(torch.stack([(displacement - v).pow(2).mean() for v in velocities]).mean())
