"""Power EMA (gamma root, beta schedule, update, state) and the AdamW settings."""

import math

import numpy as np
import pytest
import torch

from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.ema import PowerEMA, power_ema_beta, power_ema_gamma
from rcm_megatron.rcm.optimizers import adamw_kwargs, build_optimizer, clip_gradients


@pytest.mark.parametrize("s", [0.05, 0.1, 0.2])
def test_gamma_is_largest_real_root(s):
    g = power_ema_gamma(s)
    assert abs(g**3 + 7 * g**2 + (16 - s**-2) * g + (12 - s**-2)) < 1e-8 * s**-2
    # Karras et al.: sigma_rel^2 = (g+1)/((g+2)^2 (g+3))
    assert math.isclose(math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))), s, rel_tol=1e-10)
    # every other real root is smaller (found independently by bisection on a grid)
    xs = np.linspace(-20, g - 1e-6, 200001)
    f = xs**3 + 7 * xs**2 + (16 - s**-2) * xs + (12 - s**-2)
    assert np.all(xs[np.nonzero(np.diff(np.sign(f)))[0]] < g)


def test_gamma_paper_value():
    assert abs(power_ema_gamma(0.1) - 6.94) < 0.01  # sigma_rel 0.10 <-> gamma 6.94 (Karras et al.)
    assert abs(power_ema_gamma(0.05) - 16.97) < 0.01
    with pytest.raises(ValueError, match="sigma_rel"):
        power_ema_gamma(0.3)


def test_beta_and_updates():
    g = power_ema_gamma(0.1)
    assert power_ema_beta(0, g) == 0.0
    assert math.isclose(power_ema_beta(1, g), 0.5 ** (g + 1))
    assert math.isclose(power_ema_beta(9, g), 0.9 ** (g + 1))
    model = torch.nn.Linear(3, 2).double()
    ema = PowerEMA(model, 0.1)
    ref = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        beta = ema.update(model)
        assert math.isclose(beta, (1 - 1 / (n + 1)) ** (g + 1))
        for k, p in model.named_parameters():
            ref[k] = beta * ref[k] + (1 - beta) * p.detach()
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-12, atol=1e-12)
    state = ema.state_dict()
    other = PowerEMA(torch.nn.Linear(3, 2).double(), 0.05)
    other.load_state_dict(state)
    assert other.num_updates == 5 and other.gamma == ema.gamma
    target = torch.nn.Linear(3, 2).double()
    other.copy_to(target)
    torch.testing.assert_close(target.weight, ref["weight"])
    with pytest.raises(KeyError):
        PowerEMA(torch.nn.Linear(3, 2, bias=False)).load_state_dict(state)


def test_shadow_is_at_least_fp32():
    ema = PowerEMA(torch.nn.Linear(2, 2).to(torch.bfloat16))
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())


def test_adamw_settings():
    cfg = RCMConfig.preset("wan-14b")
    assert adamw_kwargs(cfg, "student") == dict(lr=1e-6, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.01)
    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg, "fake_score")
    assert opt.param_groups[0]["lr"] == 1e-7 and opt.param_groups[0]["betas"] == (0.0, 0.999)
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().mul(1e6).backward()
    assert clip_gradients(model.parameters(), cfg) is None  # no clipping by default
    norm = clip_gradients(model.parameters(), cfg.replace(grad_clip_norm=1.0))
    assert norm > 1 and torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="which"):
        adamw_kwargs(cfg, "teacher")
