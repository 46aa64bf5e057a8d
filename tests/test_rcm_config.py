"""RCMConfig validation names the field; presets."""

import json
import math

import pytest

from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.time_samplers import SamplerSpec


def test_defaults_and_presets():
    cfg = RCMConfig()
    assert (cfg.method, cfg.cfg_scale, cfg.student_update_freq, cfg.scm_loss_scale, cfg.dmd_loss_scale) == \
        ("rcm", 5.0, 5, 100.0, 1.0)
    assert cfg.p_g == SamplerSpec("lognormal", (0.7, 1.6)) and cfg.p_d == SamplerSpec("uniform_shift", (5,))
    assert (cfg.lr_student, cfg.lr_fake_score, cfg.ema_sigma_rel, cfg.grad_clip_norm) == (2e-6, 4e-7, 0.1, None)
    big = RCMConfig.preset("wan-14b", tangent_warmup_iters=100)
    assert big.p_g == SamplerSpec("lognormal", (1.5, 1.6)) and big.student_update_freq == 10
    assert (big.lr_student, big.lr_fake_score, big.tangent_warmup_iters) == (1e-6, 1e-7, 100)
    assert RCMConfig.preset("wan-1.3b") == RCMConfig(tangent_warmup_iters=1000)
    # the official recipes' tangent warmup (NVlabs/rcm wan2pt1_t2v.py) and the current official g
    assert RCMConfig.preset("wan-14b").tangent_warmup_iters == 300
    assert cfg.tangent_warmup_form == "f9b7be9" and cfg.tangent_warmup_iters == 0
    assert RCMConfig(p_g="lognormal(1.5,1.6)").p_g == big.p_g
    assert RCMConfig(method="scm").uses_fake_score is False


@pytest.mark.parametrize("field,value", [
    ("method", "gan"), ("cfg_scale", -1.0), ("cfg_scale", math.nan), ("student_update_freq", 0),
    ("student_update_freq", 2.5), ("tangent_warmup_iters", -1), ("scm_loss_scale", -1), ("dmd_weight_clip", 0.0),
    ("p_g", 3), ("p_d", "normal(1)"), ("rollout_max_steps", 0), ("rollout_random_steps", 1),
    ("rollout_fixed_times", (1.5, 1.6, 1.0)), ("rollout_fixed_times", (1.5, 1.4)), ("rollout_fixed_times", (2.0, 1, 1)),
    ("ema_sigma_rel", 0.5), ("lr_student", 0.0), ("adam_betas", (0.9,)), ("adam_betas", (0.0, 1.0)),
    ("grad_clip_norm", 0.0), ("sample_mid_times", (1.0, 1.3)), ("sample_sigma_max", -1.0), ("dcm_num_steps", 0),
    ("dcm_skip", 51), ("dcm_shift", 0.0), ("seed", 1.5), ("tangent_warmup_form", "official"),
])
def test_validation_names_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}"):
        RCMConfig(**{field: value})


def test_dict_round_trip():
    cfg = RCMConfig.preset("wan-14b", rollout_fixed_times=(1.5, 1.4, 1.0), grad_clip_norm=2.0)
    assert RCMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RCMConfig.from_dict({"mode": "scm"}).method == "scm"  # meta written before the field's rename
    with pytest.raises(ValueError, match="unknown field"):
        RCMConfig.from_dict({"cfg_scal": 5.0})


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        RCMConfig.preset("wan-5b")
