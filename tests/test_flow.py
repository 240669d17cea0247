import math

import pytest
import torch
from torch import nn

from rfp_core.config import SaliencyNetConfig, UNetConfig
from rfp_core.flow import rf
from rfp_core.nets.saliency import SaliencyNet
from rfp_core.nets.unet import UNet


def _saliency_f64() -> SaliencyNet:
    torch.manual_seed(0)
    net = SaliencyNet(SaliencyNetConfig(backbone="resnet18", pretrained=False, latent_channels=64)).double()
    with torch.no_grad():  # a trained-looking BN state, so eval-mode BN is not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
    return net.eval().requires_grad_(False)


def _grads(loss_fn, h, unet, x0, x1, t):
    unet.zero_grad(set_to_none=True)
    xt, target = rf.interpolate(x0, x1, t), x1 - x0
    loss = loss_fn(h, xt, target, unet(xt, t))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


def test_fast_saliency_loss_matches_the_reference_gradients_float64():
    """Acceptance: same loss and same UNet gradients as the original double-backward jvp."""
    sal = _saliency_f64()
    torch.manual_seed(1)
    unet = UNet(UNetConfig(model_channels=16, ch_mult=[1, 2], num_res_blocks=1, normalization="GroupNormAuto")).double()
    x0 = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    x1 = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)

    ref_loss, ref = _grads(rf.reference_saliency_loss, sal.h, unet, x0, x1, t)
    for name, fn, h in [
        ("fast", rf.saliency_weighted_loss, sal.h),
        ("fast+frozen_h", rf.saliency_weighted_loss, sal.frozen_h()),
        ("func jvp/vjp", rf.saliency_weighted_loss_func, sal.h),
    ]:
        loss, got = _grads(fn, h, unet, x0, x1, t)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0, msg=name)
        # relative to the largest reference gradient: biases feeding a GroupNorm have exactly-zero
        # gradients (rounding noise ~1e-17), which per-tensor ratios would blow up
        scale = max(float(g.abs().max()) for g in ref.values())
        worst = max(float((got[k] - ref[k]).abs().max()) for k in ref) / scale
        print(
            f"{name}: loss {float(loss):.12g} vs {float(ref_loss):.12g}, max relative gradient difference {worst:.2e}"
        )
        assert worst <= 1e-5, f"{name}: max relative gradient difference {worst:.2e}"
        # and tensor by tensor, wherever the gradient is not numerically zero
        for k in ref:
            if float(ref[k].abs().max()) > 1e-9 * scale:
                assert float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) <= 1e-5, (name, k)
        assert any(float(g.abs().max()) > 0 for g in got.values())
    assert not any(p.grad is not None for p in sal.parameters())


def _anchor_case(seed: int, times: list[float]):
    """(frozen h, a float64 UNet, x0, x1, t) for the anchored-loss checks."""
    sal = _saliency_f64()
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(model_channels=16, ch_mult=[1, 2], num_res_blocks=1, normalization="GroupNormAuto")).double()
    x0 = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    x1 = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    return sal.frozen_h(), unet, x0, x1, torch.tensor(times, dtype=torch.float64)


def test_anchored_loss_is_the_saliency_loss_plus_weighted_mse_in_value_and_gradient():
    h, unet, x0, x1, t = _anchor_case(2, [0.2, 0.6])
    weight = 7.0
    s_loss, s_grad = _grads(rf.saliency_weighted_loss, h, unet, x0, x1, t)
    m_loss, m_grad = _grads(lambda _h, _x, target, v: rf.velocity_mse_loss(v, target), h, unet, x0, x1, t)
    a_loss, a_grad = _grads(lambda *a: rf.anchored_saliency_loss(*a, mse_weight=weight), h, unet, x0, x1, t)
    torch.testing.assert_close(a_loss, s_loss + weight * m_loss)
    for k in a_grad:
        torch.testing.assert_close(a_grad[k], s_grad[k] + weight * m_grad[k])
    assert float(m_loss) > 0 and any(float(g.abs().max()) > 0 for g in m_grad.values())
    zero_loss, _ = _grads(lambda *a: rf.anchored_saliency_loss(*a, mse_weight=0.0), h, unet, x0, x1, t)
    torch.testing.assert_close(zero_loss, s_loss)


def test_saliency_params_get_no_grad_even_if_trainable_and_accumulation_adds_up():
    torch.manual_seed(0)
    sal = SaliencyNet(SaliencyNetConfig(backbone="resnet18", pretrained=False, latent_channels=16)).eval()
    x_t, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    v = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss = rf.saliency_weighted_loss(sal.h, x_t, target, v)
    loss.backward()
    first = v.grad.clone()
    rf.saliency_weighted_loss(sal.h, x_t, target, v).backward()  # gradient accumulation
    torch.testing.assert_close(v.grad, 2 * first)
    assert all(p.grad is None for p in sal.parameters())
    # the value is the mean square of J e, and the gradient is -(2/N) J^T J e
    _, u = torch.func.jvp(sal.h, (x_t,), (target - v.detach(),))
    torch.testing.assert_close(loss, u.pow(2).mean())


def test_fast_loss_under_bf16_autocast_runs_the_saliency_in_float32():
    torch.manual_seed(0)
    sal = (
        SaliencyNet(SaliencyNetConfig(backbone="resnet18", pretrained=False, latent_channels=16))
        .eval()
        .requires_grad_(False)
    )
    x_t, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    v = torch.randn(2, 3, 16, 16).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rf.saliency_weighted_loss(sal.h, x_t, target, v)
    loss.backward()
    assert loss.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    v32 = v.detach().float().requires_grad_()
    rf.saliency_weighted_loss(sal.h, x_t, target, v32).backward()
    torch.testing.assert_close(v.grad.float(), v32.grad, rtol=1e-2, atol=1e-2 * float(v32.grad.abs().max()))


def test_mse_and_interpolate():
    x0, x1 = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    xt = rf.interpolate(x0, x1, torch.tensor([0.0, 0.25]))
    assert torch.all(xt[0] == 0) and torch.all(xt[1] == 0.25)
    assert float(rf.velocity_mse_loss(torch.zeros(4), torch.full((4,), 2.0))) == 4.0


# ---------------------------------------------------------------------------- timesteps


def test_timestep_sampling():
    gen = torch.Generator().manual_seed(0)
    t = rf.sample_timesteps(20_000, "logit-normal", "cpu", generator=gen)
    assert t.shape == (20_000,) and float(t.min()) > 0 and float(t.max()) < 1
    assert abs(float(t.median()) - 0.5) < 0.02
    # denser in the middle than uniform: a quarter-width band around 0.5 holds well over 25%
    assert float(((t > 0.375) & (t < 0.625)).float().mean()) > 0.35
    u = rf.sample_timesteps(20_000, "uniform", "cpu", generator=torch.Generator().manual_seed(0))
    assert float(u.min()) >= 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    again = rf.sample_timesteps(20_000, "logit-normal", "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    with pytest.raises(ValueError, match="logit-normal"):
        rf.sample_timesteps(3, "beta", "cpu")


# ---------------------------------------------------------------------------- samplers

SAMPLERS = ["euler", "heun", "rk4"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_constant_field_is_exact_and_reverse_undoes_forward(sampler):
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    c = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    v = lambda z, t: c.expand_as(z)  # noqa: E731
    out = rf.integrate(v, x, steps=5, sampler=sampler)
    torch.testing.assert_close(out, x + c, rtol=0, atol=1e-12)
    torch.testing.assert_close(rf.integrate(v, out, steps=3, sampler=sampler, reverse=True), x, rtol=0, atol=1e-12)


def test_linear_field_higher_order_is_more_accurate():
    a = -1.3
    x = torch.randn(4, 3, dtype=torch.float64)
    v = lambda z, t: a * z  # noqa: E731
    exact = x * math.exp(a)
    err = {s: float((rf.integrate(v, x, steps=8, sampler=s) - exact).abs().max()) for s in SAMPLERS}
    assert err["rk4"] < 1e-5 < err["heun"] < err["euler"]
    assert err["heun"] < err["euler"] / 10
    # backwards in time: from x*e^a at t=1 to x at t=0
    back = rf.integrate(v, exact, steps=8, sampler="rk4", reverse=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)


def test_time_is_passed_per_sample_on_the_grid():
    seen = []

    def v(z, t):
        assert t.shape == (z.shape[0],) and t.dtype == z.dtype
        seen.append(float(t[0]))
        return t.view(-1, 1).expand_as(z)  # dx/dt = t -> x(1) = x(0) + 1/2

    x = torch.zeros(2, 1, dtype=torch.float64)
    euler = rf.integrate(v, x, steps=4, sampler="euler")
    assert seen == [0.0, 0.25, 0.5, 0.75]
    torch.testing.assert_close(euler, x + 3 / 8)  # left Riemann sum of t over 4 steps
    torch.testing.assert_close(rf.integrate(v, x, steps=4, sampler="heun"), x + 0.5)
    seen.clear()
    rf.integrate(v, x + 0.5, steps=2, sampler="euler", reverse=True)
    assert seen == [1.0, 0.5]


@pytest.mark.parametrize("sampler,steps,expected", [("euler", 12, 12), ("heun", 12, 24), ("rk4", 3, 12)])
def test_nfe_counts_velocity_calls(sampler, steps, expected):
    calls = []
    rf.integrate(lambda z, t: calls.append(1) or z * 0, torch.zeros(1, 2), steps=steps, sampler=sampler)
    assert rf.nfe(sampler, steps) == expected == len(calls)


def test_samplers_do_not_build_graphs():
    w = torch.ones(1, requires_grad=True)
    out = rf.integrate(lambda z, t: w * z, torch.ones(2, 1), steps=2)
    assert not out.requires_grad


def test_straightness():
    z0 = torch.randn(8, 3, dtype=torch.float64)
    c = torch.randn(1, 3, dtype=torch.float64)
    assert rf.straightness(lambda z, t: c.expand_as(z), z0, steps=6) == pytest.approx(0.0, abs=1e-20)
    # a rotation field bends every path
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    curved = rf.straightness(lambda z, t: z @ rot.T, torch.randn(64, 2, dtype=torch.float64), steps=20, sampler="rk4")
    assert curved > 0.01
    # velocity depending on t alone: v = t, Z1 - Z0 = 1/2 -> S = mean over grid of (1/2 - t_i)^2
    s = rf.straightness(
        lambda z, t: t.view(-1, 1).expand_as(z), torch.zeros(2, 1, dtype=torch.float64), steps=4, sampler="heun"
    )
    assert s == pytest.approx(sum((0.5 - i / 4) ** 2 for i in range(4)) / 4)


def test_anchored_loss_terms_add_up_and_leave_the_gradient_as_it_was():
    h, unet, x0, x1, t = _anchor_case(3, [0.3, 0.7])
    s_loss, s_grad = _grads(rf.saliency_weighted_loss, h, unet, x0, x1, t)
    m_loss, m_grad = _grads(lambda _h, _x, target, v: rf.velocity_mse_loss(v, target), h, unet, x0, x1, t)
    for weight in (0.0, 5.0):
        terms = {}

        def total(*a, w=weight, terms=terms):
            out = rf.anchored_saliency_loss_terms(*a, mse_weight=w)
            terms.update(sal=out.saliency, mse=out.mse)
            return out.total

        t_loss, t_grad = _grads(total, h, unet, x0, x1, t)
        torch.testing.assert_close(t_loss, terms["sal"] + weight * terms["mse"])
        torch.testing.assert_close(terms["sal"], s_loss)
        torch.testing.assert_close(terms["mse"], m_loss)
        # the gradient is the sum of the two terms' own gradients (an independent computation of each)
        for k in t_grad:
            torch.testing.assert_close(t_grad[k], s_grad[k] + weight * m_grad[k])
        assert float(terms["mse"]) > 0 and not terms["sal"].requires_grad and not terms["mse"].requires_grad
