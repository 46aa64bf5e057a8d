"""Power EMA (gamma root, beta schedule, update, state) and the trainer's AdamW settings and clipping."""

import math

import numpy as np
import pytest
import torch

from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.ema import PowerEMA, power_ema_beta, power_ema_gamma
from rcm_megatron.parallel.pipeline import PipelineLayout
from rcm_megatron.training.arguments import parse_args
from rcm_megatron.training.local_dp import LocalDataParallel
from rcm_megatron.training.model_building import optimizer_settings


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


def test_adamw_settings_and_clipping(tmp_path):
    """The trainer's AdamW of student and fake score: rCM's settings, no clipping unless --clip-grad
    (RCMConfig.grad_clip_norm); the local backend clips to it by the pre-clip global norm."""
    train = parse_args(["--model", "tiny", "--log-dir", str(tmp_path)])[0]
    cfg = RCMConfig.preset("wan-14b")
    student, fake = optimizer_settings(train, cfg, "student"), optimizer_settings(train, cfg, "fake_score")
    assert (student.lr, student.betas, student.eps, student.weight_decay) == (1e-6, (0.0, 0.999), 1e-8, 0.01)
    assert fake.lr == 1e-7 and fake.betas == (0.0, 0.999)
    assert student.clip_grad is None  # no clipping by default
    clipped = optimizer_settings(train, cfg.replace(grad_clip_norm=1.0), "student")
    model = torch.nn.Linear(2, 2)
    trained = LocalDataParallel(model, clipped, grad_group=None, pipe=PipelineLayout())
    model(torch.ones(1, 2)).sum().mul(1e6).backward()
    stepped, norm = trained.step()
    assert stepped and norm > 1 and torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) <= 1.0 + 1e-6
