"""TrigFlow wrapper: parametrization, F/x0 relations, analytic tangent vs jvp and vs a
finite difference along the probability-flow ODE, CFG, dtype handling."""

import math

import pytest
import torch

from toy_velocity_net import ToyVelocityNet, toy_batch
from rcm_megatron.rcm.trigflow import (
    guided_predict, guided_predict_with_tangent, predict, predict_with_tangent, rf_to_trig, trig_to_rf,
)

D = torch.float64


def col(t, x):
    return t.view(-1, *([1] * (x.dim() - 1)))


def literal_predict(net, x, t, ctx):
    """(x0_hat, F) from the formulas of docs/design.md §2.1 verbatim (with the 1/sin t); reference for all rcm tests."""
    c, s = torch.cos(col(t, x)), torch.sin(col(t, x))
    c_in, c_out, c_noise = 1 / (c + s), -s / (c + s), 1000 * s / (c + s)
    v = net(c_in * x, c_noise.flatten(), ctx)
    x0 = c_in * x + c_out * v
    return x0, (c * x - x0) / s


def literal_guided(net, x, t, ctx, unc, w):
    """CFG reference: P_u + w (P_c - P_u) for (x0_hat, F)."""
    x0c, Fc = literal_predict(net, x, t, ctx)
    x0u, Fu = literal_predict(net, x, t, unc.expand(x.shape[0], -1, -1))
    return x0u + w * (x0c - x0u), Fu + w * (Fc - Fu)


@pytest.fixture(scope="module")
def setup():
    net = ToyVelocityNet(seed=1)
    x0, ctx, unc, _ = toy_batch(3)
    x = torch.randn_like(x0)
    t = torch.tensor([0.05, 0.8, 1.5], dtype=D)
    return net, x, t, ctx, unc


def test_rf_trig_conversions():
    s = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=D)
    t = rf_to_trig(s)
    assert t[0] == 0 and t[-1] == math.pi / 2
    torch.testing.assert_close(trig_to_rf(t), s, rtol=0, atol=1e-15)
    sigma = torch.tensor([0.01, 1.0, 80.0], dtype=D)
    torch.testing.assert_close(trig_to_rf(torch.atan(sigma)), sigma / (1 + sigma))


def test_x0_F_relations(setup):
    net, x, t, ctx, _ = setup
    p = predict(net, x, t, ctx)
    x0_ref, F_ref = literal_predict(net, x, t, ctx)
    assert p.x0.dtype == D and p.F.dtype == D
    torch.testing.assert_close(p.x0, x0_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.F, F_ref, rtol=1e-10, atol=1e-10)
    c, s = torch.cos(col(t, x)), torch.sin(col(t, x))
    torch.testing.assert_close(c * x - s * p.F, p.x0, rtol=1e-12, atol=1e-12)


def test_exact_velocity_recovers_data():
    """A network that returns the true RF velocity (eps - x0) gives x0_hat = x0 and
    F = -sin t x0 + cos t eps (the TrigFlow velocity)."""
    x0, ctx, _, _ = toy_batch(2)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.3, 1.2], dtype=D)
    oracle = lambda lat, ts, c: eps - x0  # noqa: E731
    c, s = torch.cos(col(t, x0)), torch.sin(col(t, x0))
    p = predict(oracle, c * x0 + s * eps, t, ctx)
    torch.testing.assert_close(p.x0, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.F, -s * x0 + c * eps, rtol=1e-12, atol=1e-12)


def test_tangent_matches_jvp_of_literal_formula(setup):
    net, x, t, ctx, _ = setup
    dx, dt = torch.randn_like(x), torch.tensor([0.7, -0.3, 1.1], dtype=D)
    F, dF = predict_with_tangent(net, x, t, ctx, dx, dt)
    F_ref, dF_ref = torch.func.jvp(lambda xx, tt: literal_predict(net, xx, tt, ctx)[1], (x, t), (dx, dt))
    torch.testing.assert_close(F, F_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dF, dF_ref, rtol=1e-9, atol=1e-9)


def test_scm_tangent_equals_finite_difference_along_pf_ode(setup):
    """dF (tangents dx = cos t sin t F_T, dt = cos t sin t) = cos t sin t d/dt F(x(t), t)
    with dx/dt = F_T, checked by a float64 central difference to 1e-6 relative."""
    net, x, t, ctx, unc = setup
    teacher = ToyVelocityNet(seed=2)
    F_T = guided_predict(teacher, x, t, ctx, unc, 5.0).F
    cs = torch.cos(t) * torch.sin(t)
    _, dF = predict_with_tangent(net, x, t, ctx, col(cs, x) * F_T, cs)
    h = 1e-5
    Fp = predict(net, x + h * F_T, t + h, ctx).F
    Fm = predict(net, x - h * F_T, t - h, ctx).F
    fd = col(cs, x) * (Fp - Fm) / (2 * h)
    rel = (dF - fd).flatten(1).norm(dim=1) / fd.flatten(1).norm(dim=1)
    assert rel.max() < 1e-6, rel


def test_cfg_and_its_tangent(setup):
    net, x, t, ctx, unc = setup
    w = 5.0
    g = guided_predict(net, x, t, ctx, unc, w)
    x0_ref, F_ref = literal_guided(net, x, t, ctx, unc, w)
    torch.testing.assert_close(g.F, F_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g.x0, x0_ref, rtol=1e-10, atol=1e-10)
    dx, dt = torch.randn_like(x), torch.tensor([0.2, 0.5, -1.0], dtype=D)
    F, dF = guided_predict_with_tangent(net, x, t, ctx, unc, w, dx, dt)

    F_ref, dF_ref = torch.func.jvp(lambda xx, tt: literal_guided(net, xx, tt, ctx, unc, w)[1], (x, t), (dx, dt))
    torch.testing.assert_close(F, F_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dF, dF_ref, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="uncond_context"):
        guided_predict(net, x, t, ctx, unc.expand(2, -1, -1), w)


class Recorder(torch.nn.Module):
    """Records the dtypes the wrapper hands to the network."""

    def __init__(self, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=dtype))
        self.seen = []

    def forward(self, latents, timestep, context):
        self.seen.append((latents.dtype, timestep.dtype))
        return latents * self.w

    def forward_with_tangent(self, latents, timestep, context, latents_tan, timestep_tan):
        self.seen.append((latents_tan.dtype, timestep_tan.dtype))
        return latents * self.w, latents_tan * self.w


@pytest.mark.parametrize("dtype,ts_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float64, torch.float64)])
def test_network_dtype_casts(dtype, ts_dtype):
    net = Recorder(dtype)
    x, ctx = torch.randn(2, 1, 1, 2, 2, dtype=D), torch.zeros(2, 1, 1, dtype=dtype)
    t = torch.tensor([0.4, 0.9], dtype=D)
    p = predict(net, x, t, ctx)
    F, dF = predict_with_tangent(net, x, t, ctx, x, t)
    assert net.seen == [(dtype, ts_dtype)] * 2
    assert p.F.dtype == p.x0.dtype == F.dtype == dF.dtype == D
