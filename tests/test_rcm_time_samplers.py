"""Time samplers vs their closed-form distributions."""

import math

import pytest
import torch

from rcm_megatron.rcm.rng import KeyedRNG
from rcm_megatron.rcm.time_samplers import (
    T_MAX, T_MIN, WAN_1_3B_P_G, WAN_14B_P_G, WAN_P_D, LogNormal, SamplerSpec, UniformShift,
)

D = torch.float64


def normal_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def lognormal_cdf(t, m, sd):
    """P(atan(sigma) <= t) with log sigma ~ N(m, sd)."""
    return normal_cdf((torch.log(torch.tan(t)) - m) / sd)


def shift_cdf(t, k):
    """P(T <= t): s = sin/(sin+cos), u = s/(k - (k-1)s)."""
    s = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    return s / (k - (k - 1) * s)


def ks_distance(samples, cdf):
    x = samples.sort().values
    n = len(x)
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=D)
    return torch.maximum(i / n - f, f - (i - 1) / n).max().item()


@pytest.mark.parametrize("m,sd", [(0.7, 1.6), (1.5, 1.6), (-0.5, 0.8)])
def test_lognormal_quantiles_closed_form(m, sd):
    s = LogNormal(m, sd)
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        z = torch.tensor(math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1.0, dtype=D)).item(), dtype=D)
        expect = math.atan(math.exp(m + sd * z.item()))
        assert abs(s.from_normal(z).item() - expect) < 1e-12
    draws = s.from_normal(torch.randn(200_000, dtype=D, generator=torch.Generator().manual_seed(0)))
    assert ks_distance(draws, lambda t: lognormal_cdf(t, m, sd)) < 1.63 / math.sqrt(len(draws)) * 1.5


@pytest.mark.parametrize("k", [1.0, 3.0, 5.0])
def test_uniform_shift_closed_form(k):
    s = UniformShift(k)
    u = torch.rand(200_000, dtype=D, generator=torch.Generator().manual_seed(1))
    t = s.from_uniform(u)
    rf = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    # E[s] = k/(k-1) (1 - ln k/(k-1)); 1/2 for k = 1
    mean = 0.5 if k == 1 else k / (k - 1) * (1 - math.log(k) / (k - 1))
    assert abs(rf.mean().item() - mean) < 5 * rf.std().item() / math.sqrt(len(rf))
    assert ks_distance(t, lambda x: shift_cdf(x, k)) < 1.63 / math.sqrt(len(t)) * 1.5


@pytest.mark.parametrize("spec", [WAN_1_3B_P_G, WAN_14B_P_G, WAN_P_D])
def test_keyed_draws_follow_distribution(spec):
    sampler = spec.build()
    t = sampler.sample(KeyedRNG(3, 7), "t", torch.arange(4000))
    assert t.dtype == D and t.shape == (4000,)
    assert T_MIN <= t.min() and t.max() <= T_MAX
    cdf = (lambda x: lognormal_cdf(x, *spec.params)) if spec.name == "lognormal" else (lambda x: shift_cdf(x, 5.0))
    assert ks_distance(t, cdf) < 1.63 / math.sqrt(len(t)) * 1.5
    two = sampler.sample(KeyedRNG(3, 7), "t", torch.arange(10), (2,))
    assert two.shape == (10, 2) and not torch.equal(two[:, 0], two[:, 1])


def test_clamp_at_the_ends():
    assert UniformShift(5.0).from_uniform(torch.tensor([0.0, 1.0])).tolist() == [T_MIN, T_MAX]
    assert LogNormal(0.0, 1.0).from_normal(torch.tensor([-50.0, 50.0])).tolist() == [T_MIN, T_MAX]


def test_spec_parse_and_validation():
    assert SamplerSpec.parse("lognormal(0.7, 1.6)") == WAN_1_3B_P_G
    assert SamplerSpec.parse(str(WAN_P_D)) == WAN_P_D
    with pytest.raises(ValueError, match="SamplerSpec.name"):
        SamplerSpec("gauss", (1.0,))
    with pytest.raises(ValueError, match="SamplerSpec.params"):
        SamplerSpec("lognormal", (1.0,))
    with pytest.raises(ValueError, match="LogNormal.std"):
        SamplerSpec("lognormal", (1.0, -1.0))
    with pytest.raises(ValueError, match="UniformShift.shift"):
        UniformShift(0.0)
