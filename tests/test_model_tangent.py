"""Every layer's tangent rule and the whole model's tangent pass against torch.func.jvp of
the same computation in float64 (plain-math attention)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rcm_megatron.kernels import attention_reference, attention_with_tangent_reference
from rcm_megatron.models import WanConfig, WanDiT, preset
from rcm_megatron.models import layers
from rcm_megatron.models.attention import CrossAttention, SelfAttention
from rcm_megatron.models.block import FeedForward, WanBlock
from rcm_megatron.models.embeddings import PatchEmbedding, TimeEmbedding, sinusoidal_embedding
from rcm_megatron.models.rope import apply_rope, rope_cos_sin

TOL = 1e-10
D = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(primal_fn, tangent_fn, primals, tangents):
    """tangent_fn(*primals, *tangents) -> (y, ty) must equal jvp(primal_fn)."""
    y_ref, ty_ref = torch.func.jvp(primal_fn, primals, tangents)
    y, ty = tangent_fn(*primals, *tangents)
    assert rel(y, y_ref) < TOL
    assert ty_ref.norm() > 0, "degenerate test: zero tangent"
    assert rel(ty, ty_ref) < TOL, rel(ty, ty_ref)


def r(*shape):
    return torch.randn(*shape, dtype=D)


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm(affine):
    w, b = (r(24), r(24)) if affine else (None, None)
    check(lambda x: layers.layer_norm(x, None, 1e-6, w, b)[0],
          lambda x, tx: layers.layer_norm(x, tx, 1e-6, w, b), (r(2, 5, 24),), (r(2, 5, 24),))


def test_rms_norm_across_heads():
    w = r(32)
    check(lambda x: layers.rms_norm_across_heads(x, None, w, 1e-6, 32)[0],
          lambda x, tx: layers.rms_norm_across_heads(x, tx, w, 1e-6, 32), (r(2, 7, 32),), (r(2, 7, 32),))


@pytest.mark.parametrize("fn", [layers.gelu_tanh, layers.silu])
def test_activations(fn):
    check(lambda x: fn(x, None)[0], fn, (3 * r(4, 9),), (r(4, 9),))


def test_modulate_and_gated_residual():
    n, sh, sc, g = r(2, 5, 8), r(2, 1, 8), r(2, 1, 8), r(2, 1, 8)
    check(lambda *a: layers.modulate(a[0], None, a[1], None, a[2], None)[0],
          lambda n, sh, sc, tn, tsh, tsc: layers.modulate(n, tn, sh, tsh, sc, tsc),
          (n, sh, sc), (r(2, 5, 8), r(2, 1, 8), r(2, 1, 8)))
    check(lambda x, a, g: layers.gated_residual(x, None, a, None, g, None)[0],
          lambda x, a, g, tx, ta, tg: layers.gated_residual(x, tx, a, ta, g, tg),
          (r(2, 5, 8), r(2, 5, 8), g), (r(2, 5, 8), r(2, 5, 8), r(2, 1, 8)))


def test_sinusoidal_and_time_embedding():
    t = torch.rand(3, dtype=D) * 1000
    check(lambda t: sinusoidal_embedding(t, None, 256)[0], lambda t, tt: sinusoidal_embedding(t, tt, 256),
          (t,), (r(3),))
    emb = TimeEmbedding(preset("tiny")).double()
    check(lambda t: emb(t)[2], lambda t, tt: (lambda o: (o[2], o[3]))(emb(t, tt)), (t,), (r(3),))
    check(lambda t: emb(t)[0], lambda t, tt: (lambda o: (o[0], o[1]))(emb(t, tt)), (t,), (r(3),))


def test_patch_embedding_and_rope():
    pe = PatchEmbedding(preset("tiny")).double()
    check(lambda x: pe(x)[0], pe, (r(2, 16, 3, 4, 6),), (r(2, 16, 3, 4, 6),))
    cos, sin = rope_cos_sin((3, 2, 3), 32, dtype=D)
    check(lambda x: apply_rope(x, cos, sin), lambda x, tx: (apply_rope(x, cos, sin), apply_rope(tx, cos, sin)),
          (r(2, 18, 4, 32),), (r(2, 18, 4, 32),))


@pytest.mark.parametrize("kv_tangent", [True, False])
def test_reference_attention_tangent(kv_tangent):
    q, k, v = r(2, 9, 3, 16), r(2, 13, 3, 16), r(2, 13, 3, 16)
    q_tan = r(2, 9, 3, 16)
    k_tan, v_tan = (r(2, 13, 3, 16), r(2, 13, 3, 16)) if kv_tangent else (torch.zeros_like(k), torch.zeros_like(v))
    y_ref, y_tan_ref = torch.func.jvp(attention_reference, (q, k, v), (q_tan, k_tan, v_tan))
    out, out_tan, lse, lse_tan = attention_with_tangent_reference(q, k, v, q_tan, k_tan if kv_tangent else None,
                                                                v_tan if kv_tangent else None)
    assert rel(out, y_ref) < TOL and rel(out_tan, y_tan_ref) < TOL
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    lse_ref, lse_tan_ref = torch.func.jvp(lambda q, k: torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, -1),
                                       (q, k), (q_tan, k_tan))
    assert rel(lse, lse_ref) < TOL and rel(lse_tan, lse_tan_ref) < TOL
    del s


def _tiny_blockwise():
    cfg = preset("tiny")
    return cfg, cfg.hidden_size


def test_attention_ffn_block_layers():
    cfg, d = _tiny_blockwise()
    torch.manual_seed(0)
    cos, sin = rope_cos_sin((2, 2, 3), cfg.head_dim, dtype=D)
    x, tx = r(2, 12, d), r(2, 12, d)
    ctx = r(2, 5, d)
    sa = SelfAttention(d, cfg.num_attention_heads, cfg.eps).double()
    for p in sa.parameters():
        torch.nn.init.normal_(p, std=0.2)
    check(lambda x: sa(x, None, (cos, sin))[0], lambda x, tx: sa(x, tx, (cos, sin)), (x,), (tx,))
    ca = CrossAttention(d, cfg.num_attention_heads, cfg.eps).double()
    for p in ca.parameters():
        torch.nn.init.normal_(p, std=0.2)
    check(lambda x: ca(x, None, ctx)[0], lambda x, tx: ca(x, tx, ctx), (x,), (tx,))
    ff = FeedForward(d, cfg.ffn_hidden_size).double()
    for p in ff.parameters():
        torch.nn.init.normal_(p, std=0.1)
    check(lambda x: ff(x)[0], ff, (x,), (tx,))
    blk = WanBlock(cfg).double()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.1)
    proj, tproj = r(2, 6, d), r(2, 6, d)
    check(lambda x, p: blk(x, None, p, None, ctx, (cos, sin))[0],
          lambda x, p, tx, tp: blk(x, tx, p, tp, ctx, (cos, sin)), (x, proj), (tx, tproj))


@pytest.mark.parametrize("shape,text_len,which", [
    ((2, 16, 3, 4, 6), 7, "both"),
    ((1, 16, 1, 6, 4), 5, "x"),
    ((2, 16, 2, 4, 4), 3, "t"),
])
def test_whole_model_tangent(shape, text_len, which):
    torch.manual_seed(1)
    model = WanDiT(preset("tiny")).double()
    b = shape[0]
    x, t, ctx = r(*shape), torch.rand(b, dtype=D) * 1000, r(b, text_len, 64)
    tx = r(*shape) if which in ("both", "x") else torch.zeros(shape, dtype=D)
    tt = r(b) if which in ("both", "t") else torch.zeros(b, dtype=D)
    y_ref, ty_ref = torch.func.jvp(lambda x, t: model(x, t, ctx), (x, t), (tx, tt))
    y, ty = model.forward_with_tangent(x, t, ctx, tx, tt)
    assert rel(y, y_ref) < TOL
    assert rel(ty, ty_ref) < TOL
    assert rel(model(x, t, ctx), y) < TOL  # forward and tangent pass agree on the primal


def test_tangent_pass_keeps_no_graph():
    model = WanDiT(preset("tiny"))
    x = torch.randn(1, 16, 1, 4, 4)
    y, ty = model.forward_with_tangent(x, torch.tensor([500.0]), torch.randn(1, 3, 64), torch.randn_like(x),
                                       torch.ones(1))
    assert not y.requires_grad and not ty.requires_grad


def test_bad_inputs_name_the_shape():
    model = WanDiT(preset("tiny"))
    ctx = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 1, 4, 4), torch.ones(1), ctx)
    with pytest.raises(ValueError, match="H=5 is not divisible"):
        model(torch.randn(1, 16, 1, 5, 4), torch.ones(1), ctx)
    with pytest.raises(ValueError, match="text_dim=64"):
        model(torch.randn(1, 16, 1, 4, 4), torch.ones(1), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="num_attention_heads"):
        WanConfig(num_layers=1, hidden_size=100, ffn_hidden_size=8, num_attention_heads=3)


def test_layout_independent_init():
    a, b = WanDiT(preset("tiny")), WanDiT(preset("tiny"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    stage = WanDiT(preset("tiny"), pre_process=False, layer_range=(1, 2))
    assert torch.equal(stage.blocks["1"].attn1.to_q.weight, a.blocks["1"].attn1.to_q.weight)


class _CountMatmuls(TorchDispatchMode):
    """Counts the matrix products that run (to tell recomputed GEMMs from kept ones)."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.OPS
        return func(*args, **(kwargs or {}))


def test_activation_recompute_gives_the_same_gradients():
    """--recompute-granularity full: groups of blocks recomputed in backward; selective: GEMM (and
    attention) outputs kept, elementwise work recomputed. Same outputs and gradients (float64)."""
    from rcm_megatron.models import WanDiT, preset
    from rcm_megatron.models.recompute import RecomputeConfig

    cfg = preset("tiny").replace(num_layers=3)
    torch.manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([300.0, 700.0], dtype=torch.float64)
    ctx = torch.randn(2, 5, cfg.text_dim, dtype=torch.float64)
    grads = []
    settings = (0, 1, 2, RecomputeConfig("selective"), RecomputeConfig("selective", modules=("core_attn",)))
    backward_matmuls = []
    for n in settings:
        m = WanDiT(cfg).double()
        m.reset_parameters(seed=3)
        m.set_activation_recompute(n)
        calls = []
        m.blocks["0"].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early
        y = m(x, t, ctx)
        with _CountMatmuls() as mm:
            y.square().sum().backward()
        backward_matmuls.append(mm.count)
        assert len(calls) == (2 if n else 1)  # recomputed in backward
        grads.append((y.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    # selective keeps the GEMM outputs: its backward runs no more matrix products than no recompute
    # (core_attn also redoes attention's QK^T and PV: 2 per attention), full recompute runs the forward's again
    none, full1, full2, selective, core_attn = backward_matmuls
    assert selective == none < full1 == full2 and core_attn == none + 2 * 2 * cfg.num_layers
    for y, g in grads[1:]:
        torch.testing.assert_close(y, grads[0][0], rtol=0, atol=0)
        for k in g:
            torch.testing.assert_close(g[k], grads[0][1][k], rtol=1e-12, atol=1e-14, msg=k)
