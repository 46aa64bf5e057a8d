"""Each loss against a straightforward reference written from docs/design.md §2 (plus the
official-code r on dF), on tiny float64 tensors: per-sample losses, targets, gradients,
NaN masking; and the rollout against a per-sample loop that keeps only the last graph."""

import math

import pytest
import torch

from rcm_megatron.rcm.losses import (
    critic_regression, critic_targets, dcm_regression, dcm_targets, dcm_time_grid, dmd_regression, dmd_targets,
    scm_regression, scm_targets,
)
from rcm_megatron.rcm.rng import KeyedRNG
from rcm_megatron.rcm.rollout import rollout, training_schedule
from rcm_megatron.rcm.time_samplers import UniformShift
from toy_velocity_net import ToyVelocityNet, toy_batch
from test_rcm_trigflow import col, literal_guided, literal_predict

D = torch.float64
W = 5.0


@pytest.fixture()
def nets():
    return ToyVelocityNet(seed=1), ToyVelocityNet(seed=2), ToyVelocityNet(seed=3)  # teacher, student, fake


@pytest.fixture(scope="module")
def data():
    x0, ctx, unc, idx = toy_batch(4)
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(x0.shape, generator=g, dtype=D)
    t = torch.tensor([0.1, 0.6, 1.1, 1.5], dtype=D)
    return x0, ctx, unc, idx, eps, t


def grads(net):
    out = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    return out


def assert_grads_close(a, b, tol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


class Poison(torch.nn.Module):
    """Wraps a net; samples whose context[:, 0, 0] > 1e3 get NaN outputs (and tangents)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def _bad(self, out, ctx):
        return torch.where(col(ctx[:, 0, 0] > 1e3, out), torch.nan, out)

    def forward(self, latents, timestep, context):
        return self._bad(self.net(latents, timestep, context), context)

    def forward_with_tangent(self, latents, timestep, context, latents_tan, timestep_tan):
        v, tv = self.net.forward_with_tangent(latents, timestep, context, latents_tan, timestep_tan)
        return self._bad(v, context), self._bad(tv, context)


# ---------------------------------------------------------------- sCM


def ref_scm(teacher, student, x0, eps, t, ctx, unc, r, scale=100.0, form="f9b7be9"):
    c, s = torch.cos(col(t, x0)), torch.sin(col(t, x0))
    x_t = c * x0 + s * eps
    with torch.no_grad():
        F_T = literal_guided(teacher, x_t, t, ctx, unc, W)[1]
        F_sg, dF = torch.func.jvp(lambda xx, tt: literal_predict(student, xx, tt, ctx)[1], (x_t, t),
                                  (c * s * F_T, (c * s).flatten()))
        if form == "f9b7be9":  # NVlabs/rcm since f9b7be9: r scales only the x_t term
            g = -c * torch.sqrt(1 - r**2 * s**2) * (F_sg - F_T) - (r * c * s * x_t + dF)
        else:  # before f9b7be9: r scales dF too
            g = -c * torch.sqrt(1 - r**2 * s**2) * (F_sg - F_T) - r * (c * s * x_t + dF)
    F = literal_predict(student, x_t, t, ctx)[1]
    losses, targets = [], []
    for i in range(len(t)):
        Fi, gi = F[i], g[i] / (g[i].norm() + 0.1)
        losses.append(scale * ((Fi - Fi.detach() - gi) ** 2).sum())
        targets.append(Fi.detach() + gi)
    return torch.stack(losses), torch.stack(targets)


@pytest.mark.parametrize("form", [None, "f9b7be9", "pre-f9b7be9"])
@pytest.mark.parametrize("r", [1.0, 0.3, 0.0])
def test_scm_matches_reference(nets, data, r, form):
    """Each warmup form against its own float64 computation (student tangent from torch.func.jvp);
    form None is the default, which must be the current official one."""
    teacher, student, _ = nets
    x0, ctx, unc, _, eps, t = data
    kw = {} if form is None else {"warmup_form": form}
    tg = scm_targets(teacher, student, x0, eps, t, ctx, unc, cfg_scale=W, r=r, **kw)
    out = scm_regression(student, tg, ctx, 100.0)
    out.loss.backward()
    mine = grads(student)
    ref, ref_target = ref_scm(teacher, student, x0, eps, t, ctx, unc, r, form=form or "f9b7be9")
    ref.sum().backward()
    torch.testing.assert_close(out.per_sample, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.target, ref_target, rtol=1e-10, atol=1e-12)
    assert_grads_close(mine, grads(student))
    assert tg.valid.all() and out.loss.item() > 0


def test_warmup_forms_differ_below_one_and_agree_at_one(nets, data):
    """The two forms are different losses during warmup (so the test above can tell them apart)."""
    teacher, student, _ = nets
    x0, ctx, unc, _, eps, t = data
    for r, same in ((0.3, False), (1.0, True)):
        a, b = (scm_targets(teacher, student, x0, eps, t, ctx, unc, cfg_scale=W, r=r, warmup_form=f).g
                for f in ("f9b7be9", "pre-f9b7be9"))
        assert torch.equal(a, b) == same


def test_scm_nan_masking(nets, data):
    teacher, student, _ = nets
    x0, ctx, unc, _, eps, t = data
    bad_ctx = ctx.clone()
    bad_ctx[1, 0, 0] = 1e4
    clean = scm_regression(student, scm_targets(teacher, student, x0, eps, t, bad_ctx, unc, cfg_scale=W, r=1.0), bad_ctx)
    clean.per_sample[[0, 2, 3]].sum().backward()
    clean_grads = grads(student)
    for poisoned_teacher, poisoned_student in ((Poison(teacher), student), (teacher, Poison(student))):
        tg = scm_targets(poisoned_teacher, poisoned_student, x0, eps, t, bad_ctx, unc, cfg_scale=W, r=1.0)
        assert tg.valid.tolist() == [True, False, True, True] and (tg.g[1] == 0).all()
        out = scm_regression(poisoned_student, tg, bad_ctx)
        assert out.per_sample[1] == 0 and torch.isfinite(out.target).all()
        torch.testing.assert_close(out.per_sample[[0, 2, 3]], clean.per_sample[[0, 2, 3]].detach())
        out.loss.backward()
        assert_grads_close(grads(student), clean_grads)


# ---------------------------------------------------------------- rollout


def test_training_schedule_shapes_and_order():
    rng, idx = KeyedRNG(0, 3), torch.arange(64)
    times, n = training_schedule(rng, "r", idx, UniformShift(5.0), 4)
    assert set(n.tolist()) == {1, 2, 3, 4}
    assert (times[:, 0] == math.pi / 2).all()
    for row, k in zip(times, n.tolist()):
        mid = row[1:k]
        assert (mid[1:] <= mid[:-1]).all() and (mid > 0).all() and (row[k:] == 0).all()
    times, n = training_schedule(rng, "r", idx[:3], UniformShift(5.0), 4, random_steps=False,
                                 fixed_times=(1.5, 1.4, 1.0))
    assert (n == 4).all() and times[0].tolist() == [math.pi / 2, 1.5, 1.4, 1.0]


def ref_rollout(student, shape, times, n, ctx, rng, stream, idx):
    """One sample at a time; every step but the last without grad."""
    outs, last = [], []
    for i, key in enumerate(idx.tolist()):
        x = rng.normal(f"{stream}.noise", [key], shape)
        for k in range(int(n[i])):
            t = times[i, k : k + 1]
            if k == n[i] - 1:
                last.append((x, t))
                outs.append(literal_predict(student, x, t, ctx[i : i + 1])[0])
                break
            with torch.no_grad():
                x0 = literal_predict(student, x, t, ctx[i : i + 1])[0]
            t1 = times[i, k + 1]
            x = torch.cos(t1) * x0 + torch.sin(t1) * rng.normal(f"{stream}.renoise.{k}", [key], shape)
    return torch.cat(outs), last


@pytest.fixture()
def rolled(nets, data):
    _, student, _ = nets
    x0, ctx, unc, idx, _, _ = data
    rng = KeyedRNG(4, 9)
    times, n = training_schedule(rng, "roll", idx, UniformShift(5.0), 4)
    assert len(set(n.tolist())) > 1  # exercise ragged step counts
    res = rollout(student, x0.shape[1:], times, n, ctx, rng, "roll", idx)
    G_ref, last = ref_rollout(student, x0.shape[1:], times, n, ctx, rng, "roll", idx)
    return res, G_ref, last


def test_rollout_matches_per_sample_loop(rolled):
    res, G_ref, last = rolled
    torch.testing.assert_close(res.x0, G_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.last_x, torch.cat([x for x, _ in last]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.last_t, torch.cat([t for _, t in last]))


# ---------------------------------------------------------------- DMD


def ref_dmd(teacher, fake, G, eps, t, ctx, unc, scale=1.0):
    c, s = torch.cos(col(t, G)), torch.sin(col(t, G))
    with torch.no_grad():
        x_D = c * G.detach() + s * eps
        x0_fake = literal_predict(fake, x_D, t, ctx)[0]
        x0_T = literal_guided(teacher, x_D, t, ctx, unc, W)[0]
        weight = (G.detach() - x0_T).abs().mean(dim=(1, 2, 3, 4)).clamp_min(1e-5)
        grad = (x0_fake - x0_T) / col(weight, G)
    losses = []
    for i in range(len(t)):
        if torch.isfinite(grad[i]).all():
            losses.append(scale * ((G[i] - (G[i].detach() - grad[i])) ** 2).sum())
        else:
            losses.append(G[i].sum() * 0)
    return torch.stack(losses), G.detach() - grad


def test_dmd_matches_reference(nets, data, rolled):
    teacher, student, fake = nets
    _, ctx, unc, _, eps, t = data
    res, G_ref, _ = rolled
    out = dmd_regression(student, dmd_targets(teacher, fake, res, eps, t, ctx, unc, cfg_scale=W), ctx, 1.0)
    out.loss.backward()
    mine = grads(student)
    ref, ref_target = ref_dmd(teacher, fake, G_ref, eps, t, ctx, unc)
    ref.sum().backward()
    torch.testing.assert_close(out.per_sample, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.target, ref_target, rtol=1e-10, atol=1e-12)
    assert_grads_close(mine, grads(student))
    assert fake.conv_in.weight.grad is None and teacher.conv_in.weight.grad is None


def test_dmd_nan_masking(nets, data, rolled):
    teacher, student, fake = nets
    _, ctx, unc, _, eps, t = data
    res = rolled[0]
    bad_ctx = ctx.clone()
    bad_ctx[2, 0, 0] = 1e4
    tg = dmd_targets(Poison(teacher), fake, res, eps, t, bad_ctx, unc, cfg_scale=W)
    assert tg.valid.tolist() == [True, True, False, True] and (tg.grad[2] == 0).all()
    out = dmd_regression(student, tg, bad_ctx)
    out.loss.backward()
    assert out.per_sample[2] == 0 and all(torch.isfinite(g).all() for g in grads(student))


# ---------------------------------------------------------------- critic


def test_critic_matches_reference(nets, data, rolled):
    _, _, fake = nets
    _, ctx, _, _, eps, t = data
    G = rolled[0].x0
    out = critic_regression(fake, critic_targets(G, eps, t), ctx)
    out.loss.backward()
    mine = grads(fake)
    c, s = torch.cos(col(t, G)), torch.sin(col(t, G))
    x0_fake = literal_predict(fake, c * G + s * eps, t, ctx)[0]
    ref = ((G - x0_fake) ** 2).sum(dim=(1, 2, 3, 4)) / torch.sin(t) ** 2
    ref.sum().backward()
    torch.testing.assert_close(out.per_sample, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.target, G)
    assert_grads_close(mine, grads(fake))
    G_bad = G.clone()
    G_bad[0, 0, 0, 0, 0] = torch.nan
    bad = critic_regression(fake, critic_targets(G_bad, eps, t), ctx)
    assert bad.per_sample[0] == 0 and torch.isfinite(bad.loss)
    torch.testing.assert_close(bad.per_sample[1:], out.per_sample[1:].detach())


# ---------------------------------------------------------------- dCM


def test_dcm_grid():
    grid = dcm_time_grid(4, 5.0)
    u = torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=D)
    s = 5 * u / (1 + 4 * u)
    expect = torch.atan(s / (1 - s))  # s = 1 -> atan(inf) = pi/2
    torch.testing.assert_close(grid, expect, rtol=0, atol=1e-15)
    assert grid[0] == 0 and grid[-1] == math.pi / 2


def test_dcm_matches_reference(nets, data):
    teacher, student, _ = nets
    x0, ctx, unc, _, eps, _ = data
    N, skip = 6, 2
    n = torch.tensor([2, 3, 5, 6])
    grid = dcm_time_grid(N, 3.0)
    out = dcm_regression(student, dcm_targets(teacher, student, x0, eps, n, grid, skip, ctx, unc, cfg_scale=W), ctx, 2.0)
    out.loss.backward()
    mine = grads(student)
    losses, targets = [], []
    for i in range(4):
        t, tp = grid[n[i]], grid[n[i] - skip]
        sl = slice(i, i + 1)
        x_t = torch.cos(t) * x0[sl] + torch.sin(t) * eps[sl]
        with torch.no_grad():
            F_T = literal_guided(teacher, x_t, t[None], ctx[sl], unc, W)[1]
            x_p = torch.cos(t - tp) * x_t - torch.sin(t - tp) * F_T
            # t' = 0 is the boundary: x0_hat(x, 0) = x (the literal 1/sin form is 0/0 there)
            target = x_p if tp == 0 else literal_predict(student, x_p, tp[None], ctx[sl])[0]
        pred = literal_predict(student, x_t, t[None], ctx[sl])[0]
        losses.append(2.0 * ((pred - target) ** 2).sum())
        targets.append(target)
    ref = torch.stack(losses)
    ref.sum().backward()
    torch.testing.assert_close(out.per_sample, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.target, torch.cat(targets), rtol=1e-10, atol=1e-12)
    assert_grads_close(mine, grads(student))
