"""RCMFlowMatchScheduler (the exported student's diffusers scheduler): its rCM settings survive
save_pretrained / from_pretrained, and with keyed noise its steps are rCM's sampler steps."""

import math

import pytest
import torch

pytest.importorskip("diffusers")

from rcm_megatron.convert.diffusers_scheduler import RCMFlowMatchScheduler, initial_latents  # noqa: E402
from rcm_megatron.rcm.rng import KeyedRNG  # noqa: E402
from rcm_megatron.rcm.sampling import sampling_times  # noqa: E402
from rcm_megatron.rcm.trigflow import add_noise  # noqa: E402


def test_settings_round_trip(tmp_path):
    RCMFlowMatchScheduler(sigma_max=40.0, mid_times=(1.3, 1.0, 0.6), num_train_timesteps=500).save_pretrained(tmp_path)
    s = RCMFlowMatchScheduler.from_pretrained(tmp_path)
    assert s.rcm_sigma_max == 40.0 and s.rcm_mid_times == (1.3, 1.0, 0.6)
    assert s.config.num_train_timesteps == 500 and s.config.stochastic_sampling


def test_keyed_noise_steps_are_rcm_steps():
    """x0 = x - s v and the re-noised state are rCM's (TrigFlow state / (cos t + sin t)) with the
    noise of stream 'sample.renoise.k'."""
    shape, idx, seed = (2, 3, 4, 4), [3, 5], 11
    sched = RCMFlowMatchScheduler()
    sched.set_timesteps(3)
    sched.use_keyed_noise(seed, idx)
    times = sampling_times(3)
    x_trig = KeyedRNG(seed, 0).normal("sample.noise", idx, shape)
    x = initial_latents(x_trig).float()
    torch.testing.assert_close(x.double(), x_trig / (math.cos(times[0]) + math.sin(times[0])), rtol=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        x0 = x.double() - sched.sigmas[k].double() * v.double()
        x = sched.step(v, t, x, return_dict=False)[0]
        if k < 2:
            eps = KeyedRNG(seed, 0).normal(f"sample.renoise.{k}", idx, shape)
            t1 = torch.tensor([times[k + 1]] * 2, dtype=torch.float64)
            want = add_noise(x0, eps, t1) / (torch.cos(t1) + torch.sin(t1)).view(-1, 1, 1, 1, 1)
        else:
            want = x0
        torch.testing.assert_close(x.double(), want, rtol=1e-5, atol=1e-5)
