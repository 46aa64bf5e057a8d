"""The method with image conditioning, on tiny float64 Wan models, against literal references.

Three conditioning kinds: Wan2.1 I2V (CLIP image tokens + channel-concat condition), a Wan2.2
I2V A14B expert pair (channel-concat, two experts routed by time) and Wan2.2 TI2V (given first
frame at per-token time 0). student_step / critic_step losses and gradients equal a literal
float64 computation (the wrapper's formulas with 1/sin t, tangent by torch.func.jvp, the rollout as a
per-sample loop); planted values on the given frame change nothing; the condition reaches
every network call."""

import math

import pytest
import torch

from rcm_megatron.models import WanDiT, WanExperts
from rcm_megatron.models.config import WanConfig
from rcm_megatron.rcm.conditioning import Conditioning
from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.rng import KeyedRNG
from rcm_megatron.rcm.rollout import training_schedule
from rcm_megatron.rcm.sampling import sample, sampling_times
from rcm_megatron.rcm.step import Batch, critic_step, student_step
from rcm_megatron.rcm.trigflow import predict, rf_to_trig

D = torch.float64
C, T, H, W_ = 4, 3, 4, 4  # noisy latents per sample; patch (1,2,2) -> 12 tokens
COND_C = 1 + C  # mask + condition latents (Wan: 4 + 16)
TEXT, IMG = 16, 8
SMALL = dict(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=2, text_dim=TEXT, freq_dim=32,
             rope_max_seq_len=32)
CONFIGS = {
    "wan2.1-i2v": WanConfig(**SMALL, in_channels=C + COND_C, out_channels=C, image_dim=IMG),
    "wan2.2-i2v-experts": WanConfig(**SMALL, in_channels=C + COND_C, out_channels=C),
    "wan2.2-ti2v": WanConfig(**SMALL, in_channels=C, out_channels=C),
}
KINDS = list(CONFIGS)
BOUNDARY = 0.9


def build(kind, seed):
    if kind == "wan2.2-i2v-experts":
        return WanExperts.build(CONFIGS[kind], BOUNDARY, seed=seed).to(D)
    net = WanDiT(CONFIGS[kind])
    net.reset_parameters(seed)
    return net.to_dtype(D)


def make_batch(kind, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, C, T, H, W_, generator=g, dtype=D)
    ctx = torch.randn(n, 5, TEXT, generator=g, dtype=D)
    unc = torch.randn(1, 5, TEXT, generator=g, dtype=D)
    if kind == "wan2.2-ti2v":
        cond = Conditioning(given=x0[:, :, :1].clone())
    else:
        mask = torch.zeros(n, 1, T, H, W_, dtype=D)
        mask[:, :, 0] = 1
        latents = torch.cat([x0[:, :, :1], torch.zeros(n, C, T - 1, H, W_, dtype=D)], dim=2)
        img = torch.randn(n, 4, IMG, generator=g, dtype=D) if kind == "wan2.1-i2v" else None
        cond = Conditioning(image_context=img, concat=torch.cat([mask, latents], dim=1))
    return Batch(x0, ctx, unc, torch.arange(10, 10 + n), cond)


# ---------------------------------------------------------------- literal reference


def col(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def rows_of(cond, rows):
    return cond.select(torch.as_tensor(rows))


def lit_predict(net, x, t, ctx, cond):
    """(x0_hat, F) from the formulas verbatim: the given frames replaced and at time 0 (per-token
    timestep 0), the condition channels after c_in x, F = (cos t x - x0_hat)/sin t, 0 on given frames."""
    t = torch.as_tensor(t, dtype=D).reshape(-1).expand(x.shape[0])
    keep = torch.ones(1, 1, x.shape[2], 1, 1, dtype=D)
    if cond.given is not None:
        f = cond.given.shape[2]
        keep[:, :, :f] = 0
        x = torch.cat([cond.given, x[:, :, f:]], dim=2)
    te = col(t, x) * keep
    c, s = torch.cos(te), torch.sin(te)
    c_in, c_out = 1 / (c + s), -s / (c + s)
    c_noise = 1000 * torch.sin(t) / (torch.cos(t) + torch.sin(t))
    if cond.given is not None:  # per token: 0 on the first token frame (patch (1,2,2))
        per_frame = (H // 2) * (W_ // 2)
        tok = torch.ones(x.shape[2] * per_frame, dtype=D)
        tok[: cond.given.shape[2] * per_frame] = 0
        c_noise = c_noise[:, None] * tok[None]
    inp = c_in * x if cond.concat is None else torch.cat([c_in * x, cond.concat], dim=1)
    kw = {} if cond.image_context is None else {"image_context": cond.image_context}
    v = net(inp, c_noise, ctx, **kw)
    x0 = c_in * x + c_out * v
    s_safe = torch.where(keep.bool(), s, torch.ones_like(s))
    F = torch.where(keep.bool(), (c * x - x0) / s_safe, torch.zeros_like(x0))
    return x0, F, keep.bool().expand_as(x0)


def lit_guided(net, x, t, ctx, unc, w, cond):
    x0c, Fc, keep = lit_predict(net, x, t, ctx, cond)
    x0u, Fu, _ = lit_predict(net, x, t, unc.expand(x.shape[0], -1, -1), cond)
    return x0u + w * (x0c - x0u), Fu + w * (Fc - Fu), keep


def gen(x, keep):
    """The generated elements of each sample, [B, n]."""
    return x[keep].reshape(x.shape[0], -1)


def ref_scm(cfg, teacher, student, b, rng, r):
    idx, cond = b.indices, b.cond
    t = cfg.p_g.build().sample(rng, "scm.t", idx)
    eps = rng.normal("scm.eps", idx, b.latent_shape)
    c, s = torch.cos(col(t, b.x0)), torch.sin(col(t, b.x0))
    x_t = c * b.x0 + s * eps
    with torch.no_grad():
        F_T, keep = lit_guided(teacher, x_t, t, b.context, b.uncond_context, cfg.cfg_scale, cond)[1:]
        F_sg, dF = torch.func.jvp(lambda xx, tt: lit_predict(student, xx, tt, b.context, cond)[1], (x_t, t),
                                  (c * s * F_T, (c * s).flatten()))
        g = -c * torch.sqrt(1 - r**2 * s**2) * (F_sg - F_T) - (r * c * s * x_t + dF)
        g = gen(g, keep)
        g = g / (g.norm(dim=1, keepdim=True) + cfg.scm_g_norm_eps)
    F = gen(lit_predict(student, x_t, t, b.context, cond)[1], keep)
    return (cfg.scm_loss_scale * ((F - F.detach() - g) ** 2).sum(dim=1)).sum()


def ref_rollout(cfg, student, b, rng, stream):
    times, n = training_schedule(rng, stream, b.indices, cfg.p_d.build(), cfg.rollout_max_steps,
                                 cfg.rollout_random_steps, cfg.rollout_fixed_times)
    outs = []
    for i, key in enumerate(b.indices.tolist()):
        ci, ctx = rows_of(b.cond, [i]), b.context[i : i + 1]
        x = rng.normal(f"{stream}.noise", [key], b.latent_shape)
        for k in range(int(n[i])):
            tk = times[i, k : k + 1]
            if k == n[i] - 1:
                outs.append(lit_predict(student, x, tk, ctx, ci)[0])
                break
            with torch.no_grad():
                x0 = lit_predict(student, x, tk, ctx, ci)[0]
            t1 = times[i, k + 1]
            x = torch.cos(t1) * x0 + torch.sin(t1) * rng.normal(f"{stream}.renoise.{k}", [key], b.latent_shape)
    return torch.cat(outs)


def ref_dmd(cfg, teacher, student, fake, b, rng):
    G = ref_rollout(cfg, student, b, rng, "dmd.rollout")
    t = cfg.p_d.build().sample(rng, "dmd.t", b.indices)
    eps = rng.normal("dmd.eps", b.indices, b.latent_shape)
    with torch.no_grad():
        x_D = torch.cos(col(t, G)) * G.detach() + torch.sin(col(t, G)) * eps
        x0_fake, _, keep = lit_predict(fake, x_D, t, b.context, b.cond)
        x0_T = lit_guided(teacher, x_D, t, b.context, b.uncond_context, cfg.cfg_scale, b.cond)[0]
        Gg, fk, tk = gen(G.detach(), keep), gen(x0_fake, keep), gen(x0_T, keep)
        grad = (fk - tk) / (Gg - tk).abs().mean(dim=1, keepdim=True).clamp_min(cfg.dmd_weight_clip)
    Gw = gen(G, keep)
    return (cfg.dmd_loss_scale * ((Gw - (Gw.detach() - grad)) ** 2).sum(dim=1)).sum()


def ref_critic(cfg, student, fake, b, rng):
    with torch.no_grad():
        G = ref_rollout(cfg, student, b, rng, "critic.rollout")
    t = cfg.p_d.build().sample(rng, "critic.t", b.indices)
    eps = rng.normal("critic.eps", b.indices, b.latent_shape)
    x_D = torch.cos(col(t, G)) * G + torch.sin(col(t, G)) * eps
    x0, _, keep = lit_predict(fake, x_D, t, b.context, b.cond)
    return (((gen(G, keep) - gen(x0, keep)) ** 2).sum(dim=1) / torch.sin(t) ** 2).sum()


def grads(net):
    out = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad(set_to_none=True)
    return out


def assert_grads_close(a, b):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


CFG = RCMConfig(rollout_max_steps=3)  # iteration 4: a student step with sCM + DMD (r = 1)


@pytest.fixture(scope="module", params=KINDS)
def setup(request):
    kind = request.param
    return kind, build(kind, 1), build(kind, 2), build(kind, 3), make_batch(kind)


@pytest.mark.slow  # ~10-15 s on a shared 2-core CPU per kind
def test_student_step_matches_literal_reference(setup):
    kind, teacher, student, fake, b = setup
    out = student_step(CFG, teacher, student, fake, b, 4)
    mine = grads(student)
    assert set(k for k in out if k.startswith("loss")) == {"loss_scm", "loss_dmd"} and out["r"] == 1.0
    rng = KeyedRNG(CFG.seed, 4)
    ref_s, ref_d = ref_scm(CFG, teacher, student, b, rng, 1.0), ref_dmd(CFG, teacher, student, fake, b, rng)
    torch.testing.assert_close(out["loss_scm"], ref_s.detach() / 3, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["loss_dmd"], ref_d.detach() / 3, rtol=1e-10, atol=1e-12)
    ((ref_s + ref_d) / 3).backward()
    assert_grads_close(mine, grads(student))
    assert not grads(teacher) and not grads(fake)


def test_critic_step_matches_literal_reference(setup):
    kind, _, student, fake, b = setup
    out = critic_step(CFG, student, fake, b, 1)
    mine = grads(fake)
    ref = ref_critic(CFG, student, fake, b, KeyedRNG(CFG.seed, 1))
    torch.testing.assert_close(out["loss_critic"], ref.detach() / 3, rtol=1e-10, atol=1e-12)
    (ref / 3).backward()
    assert_grads_close(mine, grads(fake))
    assert not grads(student)


# ---------------------------------------------------------------- given first frame


class PlantGiven(torch.nn.Module):
    """Adds a large value to the velocity (and its tangent) on the given first frame: a loss that
    let the given frame in would change."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def _plant(self, v):
        return torch.cat([v[:, :, :1] + 1e3, v[:, :, 1:]], dim=2)

    def forward(self, latents, timestep, context):
        return self._plant(self.net(latents, timestep, context))

    def forward_with_tangent(self, latents, timestep, context, latents_tan, timestep_tan):
        v, dv = self.net.forward_with_tangent(latents, timestep, context, latents_tan, timestep_tan)
        return self._plant(v), self._plant(dv)


@pytest.mark.parametrize("mode,it", [("rcm", 4), ("dcm", 3)])
def test_given_frame_is_excluded(mode, it):
    """TI2V: changing the noisy input's first frame (x0, hence x_t and rollouts there) or the networks'
    outputs on it leaves every loss and gradient unchanged."""
    kind = "wan2.2-ti2v"
    teacher, student, fake = build(kind, 1), build(kind, 2), build(kind, 3)
    cfg = RCMConfig(method=mode, rollout_max_steps=3)
    b = make_batch(kind)
    fake_arg = fake if cfg.uses_fake_score else None
    base = student_step(cfg, teacher, student, fake_arg, b, it)
    g_base = grads(student)
    x0 = b.x0.clone()
    x0[:, :, :1] += 5.0
    moved = Batch(x0, b.context, b.uncond_context, b.indices, b.cond)
    nets = [(teacher, student, fake_arg, moved),
            (PlantGiven(teacher), PlantGiven(student), fake_arg and PlantGiven(fake_arg), b)]
    for tch, stu, fk, bb in nets:
        out = student_step(cfg, tch, stu, fk, bb, it)
        for k in base:
            torch.testing.assert_close(out[k], base[k], rtol=1e-12, atol=1e-14)
        assert_grads_close(grads(student), g_base)
    # the critic likewise
    c_base = critic_step(cfg, student, fake, b, 1)["loss_critic"]
    grads(fake)
    c_plant = critic_step(cfg, PlantGiven(student), PlantGiven(fake), b, 1)["loss_critic"]
    torch.testing.assert_close(c_plant, c_base, rtol=1e-12, atol=1e-14)
    # the plant is visible to a step without a given frame (so the equalities above can fail)
    nocond = Batch(b.x0, b.context, b.uncond_context, b.indices)
    name = "loss_scm" if mode == "rcm" else "loss_dcm"
    plain = student_step(cfg, teacher, student, fake_arg, nocond, it)[name]
    planted = student_step(cfg, PlantGiven(teacher), PlantGiven(student), fake_arg and PlantGiven(fake_arg), nocond, it)
    assert not torch.allclose(planted[name], plain)
    grads(student)


def test_sample_keeps_the_given_frame():
    kind = "wan2.2-ti2v"
    b = make_batch(kind)
    out = sample(build(kind, 2), b.context, b.latent_shape, b.indices, seed=3, num_steps=2, cond=b.cond)
    torch.testing.assert_close(out[:, :, :1], b.x0[:, :, :1], rtol=0, atol=0)
    assert (out[:, :, 1:] - b.x0[:, :, 1:]).abs().max() > 0.1


# ---------------------------------------------------------------- the condition reaches every pass


class Spy(torch.nn.Module):
    """Records, per call, whether the batch's condition came with it (rows matched by context)."""

    def __init__(self, net, b, kind):
        super().__init__()
        self.net, self.b, self.kind, self.calls = net, b, kind, []

    def _check(self, latents, timestep, context, image_context, name):
        rows = [next(i for i in range(len(self.b.context)) if torch.equal(self.b.context[i], c)
                     or torch.equal(self.b.uncond_context[0], c)) for c in context]
        uncond = [torch.equal(self.b.uncond_context[0], c) for c in context]
        cond = self.b.cond
        ok = True
        if kind_has_image(self.kind):
            ok &= image_context is not None and all(
                u or torch.equal(image_context[j], cond.image_context[r]) for j, (r, u) in enumerate(zip(rows, uncond)))
        else:
            ok &= image_context is None
        if cond.concat is not None:
            ok &= latents.shape[1] == C + COND_C and all(
                u or torch.equal(latents[j, C:], cond.concat[r]) for j, (r, u) in enumerate(zip(rows, uncond)))
        if cond.given is not None:
            ok &= timestep.dim() == 2 and bool((timestep[:, :4] == 0).all()) and torch.equal(
                timestep[:, 4:], timestep[:, 4:5].expand(-1, timestep.shape[1] - 4))
        self.calls.append((name, bool(ok)))

    def forward(self, latents, timestep, context, image_context=None):
        self._check(latents, timestep, context, image_context, "forward")
        return self.net(latents, timestep, context, image_context)

    def forward_with_tangent(self, latents, timestep, context, latents_tan, timestep_tan, image_context=None):
        self._check(latents, timestep, context, image_context, "tangent")
        if self.b.cond.given is not None:
            assert (timestep_tan[:, :4] == 0).all() and (latents_tan[:, :, :1] == 0).all()
        assert latents_tan.shape[1] == C
        return self.net.forward_with_tangent(latents, timestep, context, latents_tan, timestep_tan, image_context)


def kind_has_image(kind):
    return CONFIGS[kind].image_dim is not None


@pytest.mark.parametrize("kind", KINDS)
def test_condition_reaches_every_pass(kind):
    """Every call of teacher (both CFG sides, tangent), student (rollout, tangent, with-grad) and fake
    score (DMD, critic) in sCM + DMD, dCM and critic steps gets the condition of its own rows."""
    b = make_batch(kind, n=3)
    b = Batch(b.x0, b.context, b.uncond_context, b.indices, b.cond)
    spies = [Spy(build(kind, s), b, kind) for s in (1, 2, 3)]
    teacher, student, fake = spies
    student_step(CFG, teacher, student, fake, b, 4)
    student_step(RCMConfig(method="dcm"), teacher, student, None, b, 3)
    critic_step(CFG, student, fake, b, 1)
    for spy in spies:
        assert spy.calls and all(ok for _, ok in spy.calls), spy.calls
    assert {"forward", "tangent"} <= {n for n, _ in student.calls}
    assert {n for n, _ in teacher.calls} == {"forward"} and {n for n, _ in fake.calls} == {"forward"}


# ---------------------------------------------------------------- two experts


def test_experts_route_on_trigflow_time_through_the_wrapper():
    """The wrapper's c_noise is the flow-matching timestep 1000 sigma: TrigFlow t >= atan(b/(1-b))
    runs the high-noise expert, below it the low-noise one (per sample in a mixed batch)."""
    kind = "wan2.2-i2v-experts"
    experts, b = build(kind, 1), make_batch(kind)
    tb = float(rf_to_trig(torch.tensor(BOUNDARY, dtype=D)))
    t = torch.tensor([tb + 1e-6, tb - 1e-6, 0.5], dtype=D)
    x = torch.randn(3, C, T, H, W_, dtype=D)
    got = predict(experts, x, t, b.context, b.cond).x0
    for i, expert in enumerate([experts.high_noise, experts.low_noise, experts.low_noise]):
        one = predict(expert, x[i : i + 1], t[i : i + 1], b.context[i : i + 1], rows_of(b.cond, [i])).x0
        torch.testing.assert_close(got[i : i + 1], one, rtol=1e-12, atol=1e-12)
    assert sampling_times(4)[:2][1] > tb > sampling_times(4)[2]  # 4-step sampling uses both experts
    assert math.isclose(1000 * math.sin(tb) / (math.cos(tb) + math.sin(tb)), 1000 * BOUNDARY, rel_tol=1e-12)


# ---------------------------------------------------------------- batches


def test_batch_rejects_a_conditioning_that_does_not_fit():
    b = make_batch("wan2.1-i2v", n=3)
    with pytest.raises(ValueError, match="Conditioning: batch size 2, expected 3"):
        Batch(b.x0, b.context, b.uncond_context, b.indices, b.cond.select(torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"Conditioning.concat: expected \[B,C_cond,3,4,4\]"):
        Batch(b.x0, b.context, b.uncond_context, b.indices, Conditioning(concat=b.cond.concat[:, :, :2]))
    with pytest.raises(ValueError, match=r"Conditioning.given: expected \[B,4,F<=3,4,4\]"):
        Batch(b.x0, b.context, b.uncond_context, b.indices, Conditioning(given=b.x0[:, :2, :1]))
    with pytest.raises(ValueError, match="same batch size"):
        Conditioning(image_context=b.cond.image_context[:2], concat=b.cond.concat)


def test_conditioning_cat_and_select_are_inverse():
    cond = make_batch("wan2.1-i2v", n=3).cond
    parts = [cond.select(torch.tensor([0])), cond.select(torch.tensor([1, 2]))]
    whole = Conditioning.cat(parts)
    assert torch.equal(whole.image_context, cond.image_context) and torch.equal(whole.concat, cond.concat)
    assert whole.given is None and Conditioning.cat([None, None]) is None
    with pytest.raises(ValueError, match="every micro-batch"):
        Conditioning.cat([parts[0], None])
