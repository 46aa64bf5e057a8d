"""Step plan: which models get gradients, layout invariance of whole steps (any split of a
global batch reproduces the losses and summed gradients), and the few-step sampler."""

import math

import pytest
import torch

from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.rng import KeyedRNG
from rcm_megatron.rcm.sampling import PAPER_MID_TIMES, sample, sampling_times
from rcm_megatron.rcm.step import Batch, critic_step, student_step
from toy_velocity_net import ToyVelocityNet, toy_batch
from test_rcm_trigflow import literal_predict


@pytest.fixture()
def nets():
    return ToyVelocityNet(seed=1), ToyVelocityNet(seed=2), ToyVelocityNet(seed=3)  # teacher, student, fake


def batch(rows=None, n=8):
    x0, ctx, unc, idx = toy_batch(n)
    rows = list(range(n)) if rows is None else rows
    return Batch(x0[rows], ctx[rows], unc, idx[rows])


def take_grads(net):
    out = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    return out


# iteration chosen so that the schedule makes it a student step of that mode
MODES = [("rcm", 4, {"loss_scm", "loss_dmd"}), ("scm", 0, {"loss_scm"}), ("dmd", 9, {"loss_dmd"}),
         ("dcm", 3, {"loss_dcm"})]


@pytest.mark.parametrize("mode,it,keys", MODES)
def test_student_step_trains_only_the_student(nets, mode, it, keys):
    teacher, student, fake = nets
    cfg = RCMConfig(method=mode)
    out = student_step(cfg, teacher, student, fake if cfg.uses_fake_score else None, batch(n=3), it)
    assert {k for k in out if k.startswith("loss")} == keys
    assert all(torch.isfinite(v) for v in out.values())
    g = take_grads(student)
    assert all(x is not None and torch.isfinite(x).all() for x in g) and any(x.abs().sum() > 0 for x in g)
    assert all(x is None for x in take_grads(teacher) + take_grads(fake))


def test_warmup_student_step_is_scm_only(nets):
    teacher, student, fake = nets
    out = student_step(RCMConfig(tangent_warmup_iters=10), teacher, student, fake, batch(n=2), 5)
    assert {k for k in out if k.startswith("loss")} == {"loss_scm"} and out["r"] == 0.5


def test_critic_step_trains_only_the_fake_score(nets):
    teacher, student, fake = nets
    out = critic_step(RCMConfig(), student, fake, batch(n=3), 1)
    assert set(out) == {"loss_critic", "critic_t_mean", "critic_valid_frac"} and out["loss_critic"] > 0
    assert all(x is not None and torch.isfinite(x).all() for x in take_grads(fake))
    assert all(x is None for x in take_grads(student))


def test_step_plan_errors(nets):
    teacher, student, fake = nets
    with pytest.raises(ValueError, match="critic step"):
        student_step(RCMConfig(), teacher, student, fake, batch(n=2), 0)
    with pytest.raises(ValueError, match="fake score"):
        student_step(RCMConfig(), teacher, student, None, batch(n=2), 4)


@pytest.mark.parametrize("split", [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]], [[5], [0, 1, 2, 3, 4, 6, 7]]])
def test_layout_invariance(nets, split):
    """Losses and accumulated grads of a global batch of 8 equal the sums over any split
    (as if the parts ran on different data-parallel ranks)."""
    teacher, student, fake = nets
    cfg = RCMConfig(rollout_max_steps=3)
    for step, args, it, trained in ((student_step, (teacher, student, fake), 4, student),
                                    (critic_step, (student, fake), 2, fake)):
        whole = step(cfg, *args, batch(), it, loss_normalizer=8)
        g_whole = take_grads(trained)
        parts = [step(cfg, *args, batch(rows), it, loss_normalizer=8) for rows in split]
        for k in whole:
            if k.startswith("loss"):
                torch.testing.assert_close(sum(p[k] for p in parts), whole[k], rtol=1e-12, atol=1e-12)
        for a, b in zip(take_grads(trained), g_whole):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_sampling_times():
    a = math.atan(80.0)
    assert sampling_times(1) == [a, 0.0]
    assert sampling_times(4) == [a, 1.5, 1.4, 1.0, 0.0]
    assert sampling_times(3, PAPER_MID_TIMES, 1600.0) == [math.atan(1600.0), 1.3, 1.0, 0.0]
    with pytest.raises(ValueError, match="num_steps"):
        sampling_times(5)


@pytest.mark.parametrize("n", [1, 3])
def test_sample_matches_manual_loop(nets, n):
    student = nets[1]
    x0, ctx, _, idx = toy_batch(3)
    shape = tuple(x0.shape[1:])
    out = sample(student, ctx, shape, idx, seed=7, num_steps=n)
    rng = KeyedRNG(7, 0)
    times = sampling_times(n)
    x = rng.normal("sample.noise", idx, shape)
    for i in range(n):
        x0_hat = literal_predict(student, x, torch.full((3,), times[i], dtype=torch.float64), ctx)[0]
        if i < n - 1:
            t1 = times[i + 1]
            x = math.cos(t1) * x0_hat + math.sin(t1) * rng.normal(f"sample.renoise.{i}", idx, shape)
    torch.testing.assert_close(out, x0_hat.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample(student, ctx[1:], shape, idx[1:], seed=7, num_steps=n), out[1:])
