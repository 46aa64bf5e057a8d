"""Image-to-video Wan models against their oracles: diffusers' WanTransformer3DModel (random
weights, fp32) for the architecture, torch.func.jvp in float64 for the tangent pass.

Wan2.1 I2V (36 channels, CLIP image tokens through added K/V), a Wan2.2 I2V A14B expert
(36 channels, no image tokens), Wan2.2 TI2V (48 channels, per-token timesteps) and the
two-expert wrapper (diffusers' pipeline choice by the boundary)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

from rcm_megatron.convert import load_diffusers_wan  # noqa: E402
from rcm_megatron.convert.diffusers_wan import NAME_MAP, _map_name, config_from_diffusers, diffusers_config  # noqa: E402
from rcm_megatron.models import PRESETS, WanDiT, WanExperts, expand_timesteps, preset  # noqa: E402
from rcm_megatron.models.timesteps import token_grid  # noqa: E402

TEXT_LEN = 512  # diffusers' I2V attention splits image from text tokens by assuming 512 text tokens
SMALL = dict(num_attention_heads=4, attention_head_dim=32, text_dim=64, ffn_dim=256, num_layers=2, rope_max_seq_len=64)
KINDS = {  # diffusers config of each image-to-video kind, at a small size
    "wan2.1-i2v": dict(in_channels=36, out_channels=16, image_dim=48, added_kv_proj_dim=128),
    "wan2.2-i2v-expert": dict(in_channels=36, out_channels=16),
    "wan2.2-ti2v": dict(in_channels=48, out_channels=48),
}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


_MODELS = {}


def diffusers_model(kind, seed=0):
    """Built once per (kind, seed) in this module (building is most of a parity test's time)."""
    if (kind, seed) not in _MODELS:
        _MODELS[kind, seed] = _build(kind, seed)
    return _MODELS[kind, seed]


def _build(kind, seed):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**SMALL, **KINDS[kind]).eval()
    with torch.no_grad():  # perturb every parameter so norms/biases/tables are not at their init
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def inputs(kind, shape, g, text_len=TEXT_LEN, dtype=torch.float32):
    b = shape[0]
    x = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 1000
    ctx = torch.randn(b, text_len, 64, generator=g, dtype=dtype)
    img = torch.randn(b, 9, 48, generator=g, dtype=dtype) if kind == "wan2.1-i2v" else None
    if kind == "wan2.2-ti2v":
        t = expand_timesteps(t, token_grid(shape, (1, 2, 2)))
    return x, t, ctx, img


_OURS = {}


def _ours(kind):
    if kind not in _OURS:
        _OURS[kind] = load_diffusers_wan(diffusers_model(kind)).eval()
    return _OURS[kind]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("frames,h,w", [(3, 8, 12), (1, 4, 4), (5, 6, 10)])
def test_matches_diffusers(kind, frames, h, w):
    ref = diffusers_model(kind)
    ours = _ours(kind)
    assert ours.config.image_dim == (48 if kind == "wan2.1-i2v" else None)
    g = torch.Generator().manual_seed(frames * 100 + h)
    x, t, ctx, img = inputs(kind, (2, ref.config.in_channels, frames, h, w), g)
    with torch.no_grad():
        a = ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
        b = ours(x, t, ctx, image_context=img)
    assert b.shape == (2, ref.config.out_channels, frames, h, w)
    assert rel(b, a) <= 1e-5


def test_per_token_timesteps_in_general_match_diffusers():
    """Any [B, S] timesteps (not only the TI2V mask times t), batch 2, odd frames."""
    ref = diffusers_model("wan2.2-ti2v", seed=1)
    ours = load_diffusers_wan(ref).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 48, 3, 6, 4, generator=g)
    t = torch.rand(2, 3 * 3 * 2, generator=g) * 1000
    ctx = torch.randn(2, 11, 64, generator=g)
    with torch.no_grad():
        assert rel(ours(x, t, ctx), ref(x, t, ctx, return_dict=False)[0]) <= 1e-5


def test_expand_timesteps_is_diffusers_mask():
    """diffusers' pipeline: (first_frame_mask[0][0][:, ::2, ::2] * t).flatten() per sample."""
    t = torch.tensor([700.0, 20.0])
    mask = torch.ones(1, 48, 3, 8, 12)
    mask[:, :, 0] = 0
    want = torch.stack([(mask[0][0][:, ::2, ::2] * ti).flatten() for ti in t])
    assert torch.equal(expand_timesteps(t, token_grid(mask.shape, (1, 2, 2))), want)
    assert torch.equal(expand_timesteps(torch.ones(1), (3, 2, 2), given_frames=2)[0], torch.tensor([0.0] * 8 + [1.0] * 4))
    with pytest.raises(ValueError, match="given_frames must be in 0..3"):
        expand_timesteps(t, (3, 4, 6), given_frames=4)


@pytest.mark.parametrize("ratio", [0.9, 0.875])
def test_experts_choose_as_the_diffusers_pipeline(ratio):
    """transformer (high noise) at t >= ratio * 1000, transformer_2 below; a batch may mix them."""
    high, low = diffusers_model("wan2.2-i2v-expert", 2), diffusers_model("wan2.2-i2v-expert", 3)
    experts = WanExperts(load_diffusers_wan(high), load_diffusers_wan(low), ratio).eval()
    boundary = ratio * 1000
    t = torch.tensor([boundary, boundary - 1e-3, 999.0, 3.0])
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(4, 36, 3, 4, 6, generator=g), torch.randn(4, 7, 64, generator=g)
    assert experts.uses_high_noise(t).tolist() == [True, False, True, False]
    with torch.no_grad():
        out = experts(x, t, ctx)
        for i in range(4):
            ref = high if t[i] >= boundary else low
            assert rel(out[i:i + 1], ref(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], return_dict=False)[0]) <= 1e-5
        torch.testing.assert_close(experts(x[:1], t[:1], ctx[:1]), out[:1], rtol=1e-5, atol=1e-5)  # one-expert batch


# ----------------------------------------------------------------------------- tangents (fp64 oracle)


def tiny(kind):
    c = preset("tiny")
    return {"wan2.1-i2v": c.replace(in_channels=36, out_channels=16, image_dim=48),
            "wan2.2-i2v-expert": c.replace(in_channels=36, out_channels=16),
            "wan2.2-ti2v": c.replace(in_channels=48, out_channels=48)}[kind]


@pytest.mark.parametrize("kind,which", [(k, "both") for k in sorted(KINDS)] + [("wan2.2-ti2v", "t")])
def test_tangent_matches_jvp(kind, which):
    """The noisy channels and the time carry tangents; condition channels, text and image tokens
    none. latents_tan covering only the noisy channels = the full-width tangent zero on the rest."""
    cfg = tiny(kind)
    model = WanDiT(cfg).double()
    model.reset_parameters(seed=4)
    g = torch.Generator().manual_seed(7)
    x, t, ctx, img = inputs(kind, (2, cfg.in_channels, 3, 4, 6), g, text_len=5, dtype=torch.float64)
    t_sample = t[:, -1] if t.dim() == 2 else t  # the sample's time (TI2V: that of the generated tokens)
    grid = (3, 2, 3)
    noisy = cfg.out_channels
    tx = torch.randn(2, noisy, 3, 4, 6, generator=g, dtype=torch.float64) * (which != "t")
    tt = torch.randn(2, generator=g, dtype=torch.float64) * (which != "x")
    pad = torch.zeros(2, cfg.in_channels - noisy, 3, 4, 6, dtype=torch.float64)
    cond = x[:, noisy:]

    def times(s):
        return expand_timesteps(s, grid) if kind == "wan2.2-ti2v" else s

    def f(noisy_x, s):
        return model(torch.cat([noisy_x, cond], 1), times(s), ctx, image_context=img)

    y_ref, ty_ref = torch.func.jvp(f, (x[:, :noisy], t_sample), (tx, tt))
    y, ty = model.forward_with_tangent(x, times(t_sample), ctx, tx, times(tt), image_context=img)
    assert ty_ref.norm() > 0
    assert rel(y, y_ref) < 1e-10 and rel(ty, ty_ref) < 1e-10
    _, ty_full = model.forward_with_tangent(x, times(t_sample), ctx, torch.cat([tx, pad], 1), times(tt), image_context=img)
    assert rel(ty_full, ty) < 1e-12


def test_per_token_time_tangent_matches_jvp():
    """A general per-token time tangent [B, S] (zero on the given tokens stays exact)."""
    cfg = tiny("wan2.2-ti2v")
    model = WanDiT(cfg).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 48, 3, 4, 2, generator=g, dtype=torch.float64)
    t = torch.rand(2, 6, generator=g, dtype=torch.float64) * 1000
    ctx = torch.randn(2, 4, 64, generator=g, dtype=torch.float64)
    tx, tt = torch.randn_like(x), torch.randn(2, 6, generator=g, dtype=torch.float64)
    tt[:, :2] = 0  # the given first frame: no time tangent
    y_ref, ty_ref = torch.func.jvp(lambda x, t: model(x, t, ctx), (x, t), (tx, tt))
    y, ty = model.forward_with_tangent(x, t, ctx, tx, tt)
    assert rel(y, y_ref) < 1e-10 and rel(ty, ty_ref) < 1e-10


def test_experts_tangent_matches_each_expert():
    experts = WanExperts.build(tiny("wan2.2-i2v-expert"), 0.9, seed=5).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 36, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([950.0, 100.0, 901.0], dtype=torch.float64)
    ctx = torch.randn(3, 5, 64, generator=g, dtype=torch.float64)
    tx, tt = torch.randn(3, 16, 2, 4, 4, generator=g, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y, ty = experts.forward_with_tangent(x, t, ctx, tx, tt)
    for i, expert in enumerate([experts.high_noise, experts.low_noise, experts.high_noise]):
        s = slice(i, i + 1)
        y_i, ty_i = torch.func.jvp(lambda a, b: expert(torch.cat([a, x[s, 16:]], 1), b, ctx[s]),
                                   (x[s, :16], t[s]), (tx[s], tt[s]))
        assert rel(y[s], y_i) < 1e-10 and rel(ty[s], ty_i) < 1e-10
    assert not torch.equal(experts.high_noise.blocks["0"].attn1.to_q.weight, experts.low_noise.blocks["0"].attn1.to_q.weight)


def test_experts_gradients_reach_only_the_chosen_expert():
    experts = WanExperts.build(tiny("wan2.2-i2v-expert"), 0.9)
    x, ctx = torch.randn(2, 36, 1, 4, 4), torch.randn(2, 3, 64)
    experts(x, torch.tensor([100.0, 200.0]), ctx).square().sum().backward()
    assert all(p.grad is None for p in experts.high_noise.parameters())
    assert experts.low_noise.blocks["1"].ffn.fc2.weight.grad.norm() > 0


# ----------------------------------------------------------------------------- presets and bad input


@pytest.mark.parametrize("name,official", [
    ("wan-i2v-14b-480p", dict(in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120)),
    ("wan-i2v-14b-720p", dict(in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120)),
    ("wan2.2-i2v-a14b", dict(in_channels=36, out_channels=16)),
    ("wan2.2-ti2v-5b", dict(in_channels=48, out_channels=48, num_attention_heads=24, ffn_dim=14336, num_layers=30)),
])
def test_presets_are_the_released_architectures(name, official):
    """The diffusers config of the release (14B defaults plus the listed fields) builds the same
    parameter names and shapes as our preset (both on the meta device)."""
    kwargs = dict(num_attention_heads=40, attention_head_dim=128, text_dim=4096, ffn_dim=13824, num_layers=40)
    kwargs.update(official)
    cfg = preset(name)
    assert config_from_diffusers(kwargs) == cfg
    assert config_from_diffusers(diffusers_config(cfg)) == cfg
    with torch.device("meta"):
        ref, ours = WanTransformer3DModel(**kwargs), WanDiT(cfg)
    theirs = {_map_name(k, NAME_MAP): tuple(v.shape) for k, v in ref.state_dict().items()
              if not k.endswith("norm_added_q.weight")}
    assert theirs == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert name in PRESETS


def test_bad_inputs_name_the_shape():
    i2v, ti2v = WanDiT(tiny("wan2.1-i2v")), WanDiT(tiny("wan2.2-ti2v"))
    x, ctx, img, t = torch.randn(1, 36, 2, 4, 4), torch.randn(1, 3, 64), torch.randn(1, 5, 48), torch.ones(1)
    with pytest.raises(ValueError, match=r"image_context must be \[B=1, L_img, image_dim=48\], got None"):
        i2v(x, t, ctx)
    with pytest.raises(ValueError, match=r"image_dim=48\], got \(1, 5, 32\)"):
        i2v(x, t, ctx, image_context=torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="image_context given to a model without image conditioning"):
        ti2v(torch.randn(1, 48, 2, 4, 4), t, ctx, image_context=img)
    with pytest.raises(ValueError, match=r"latents_tan must be \[B, in_channels=36 or out_channels=16"):
        i2v.forward_with_tangent(x, t, ctx, torch.randn(1, 20, 2, 4, 4), t, image_context=img)
    with pytest.raises(ValueError, match=r"timestep must have shape \[1\] or per token \[1, 8\], got \(1, 7\)"):
        ti2v(torch.randn(1, 48, 2, 4, 4), torch.ones(1, 7), ctx)
    with pytest.raises(ValueError, match=r"timestep_tan must have the timestep's shape \(1, 8\), got \(1,\)"):
        ti2v.forward_with_tangent(torch.randn(1, 48, 2, 4, 4), torch.ones(1, 8), ctx, None, torch.ones(1))
    state = i2v.embed(x, t, ctx, image_context=img)
    state.image_context = None  # a pipeline stage that did not pass the image tokens on
    with pytest.raises(ValueError, match="StageState.image_context is None"):
        i2v.run_blocks(state)
    experts = WanExperts.build(tiny("wan2.2-ti2v"), 0.9)
    with pytest.raises(ValueError, match=r"experts are chosen per sample: timestep must be \[B\], got \(1, 8\)"):
        experts(torch.randn(1, 48, 2, 4, 4), torch.ones(1, 8), ctx)
    with pytest.raises(ValueError, match="boundary_ratio must be in"):
        WanExperts.build(tiny("wan2.2-ti2v"), 1.5)
    with pytest.raises(ValueError, match="share one architecture"):
        WanExperts(WanDiT(tiny("wan2.2-ti2v")), WanDiT(tiny("wan2.1-i2v")), 0.9)
    with pytest.raises(ValueError, match="image_dim must be a positive integer or None"):
        tiny("wan2.1-i2v").replace(image_dim=0)
    with pytest.raises(ValueError, match="added_kv_proj_dim = heads \\* head dim = 128"):
        config_from_diffusers(dict(SMALL, image_dim=48, added_kv_proj_dim=64))
    with pytest.raises(ValueError, match="FLF2V"):
        config_from_diffusers(dict(SMALL, image_dim=48, added_kv_proj_dim=128, pos_embed_seq_len=514))
