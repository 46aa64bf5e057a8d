"""The fused tangent-carrying Triton kernels (kernels/norm_modulate, qk_norm_rope, pointwise) against
float64 oracles: ``torch.func.jvp`` of the plain-math op on the same input values (CPU,
TRITON_INTERPRET=1).

Shapes as the model uses them: tokens [B, S, D] with odd S and a hidden size that is not a power
of two, modulation per sample [B, 1, D] or per token [B, S, D] (Wan2.2 TI2V), the latter as the
strided views the block takes of [B, S, 6, D]. bf16 and fp32 activations; modulation in fp32 as
the model keeps it. Outputs must be close to the oracle to within the output dtype's rounding, and
no worse than the PyTorch path of the model computes in the same dtypes (``models.layers``).
"""

import pytest
import torch
import torch.nn.functional as F

from rcm_megatron.kernels import fused_ops
from rcm_megatron.kernels.norm_modulate import norm_modulate
from rcm_megatron.kernels.pointwise import gated_residual, gelu_tanh
from rcm_megatron.kernels.qk_norm_rope import qk_norm_rope, row_sums
from rcm_megatron.models.rope import apply_rope, rope_cos_sin

B, S, HEADS, HEAD_DIM = 2, 7, 5, 20
D = HEADS * HEAD_DIM  # 100: not a power of two, masked tail in every row
EPS = 1e-6
TOL = {torch.bfloat16: 1e-2, torch.float32: 2e-6}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "kernel left non-finite values"
    return float((a - b).norm() / b.norm())


def max_rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def close(got, ref, dtype):
    assert got.dtype == dtype
    assert rel(got, ref) < TOL[dtype], (rel(got, ref), dtype)
    assert max_rel(got, ref) < 4 * TOL[dtype], (max_rel(got, ref), dtype)


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape)).to(dtype)


def modulation(per_token: bool, n: int = 2):
    """n modulation tensors as the block slices them: per sample [B, 1, D] views of [B, 6, D]
    (unsqueezed), per token [B, S, D] views of [B, S, 6, D]."""
    if per_token:
        return rnd(B, S, 6, D, scale=0.5).unbind(2)[:n]
    return rnd(B, 6, D, scale=0.5).unsqueeze(2).unbind(1)[:n]


def jvp64(fn, primals, tangents):
    return torch.func.jvp(fn, tuple(p.double() for p in primals), tuple(t.double() for t in tangents))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True])
def test_layer_norm_modulate(dtype, per_token):
    torch.manual_seed(0)
    x, x_tan = rnd(B, S, D, dtype=dtype, scale=3.0) + 1.0, rnd(B, S, D, dtype=dtype)
    shift, scale = modulation(per_token)
    shift_tan, scale_tan = modulation(per_token)
    y, y_tan = norm_modulate(x, x_tan, EPS, shift, shift_tan, scale, scale_tan)
    ref, ref_tan = jvp64(lambda x, sh, sc: F.layer_norm(x, (D,), eps=EPS) * (1 + sc) + sh,
                         (x, shift, scale), (x_tan, shift_tan, scale_tan))
    close(y, ref, dtype)
    close(y_tan, ref_tan, dtype)
    y_only, none = norm_modulate(x, None, EPS, shift, None, scale, None)
    assert none is None and torch.equal(y_only, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_norm_affine_and_plain(dtype):
    torch.manual_seed(1)
    x, x_tan = rnd(B, S, D, dtype=dtype), rnd(B, S, D, dtype=dtype)
    w, b = rnd(D) + 1, rnd(D)
    y, y_tan = norm_modulate(x, x_tan, EPS, weight=w, bias=b)
    ref, ref_tan = jvp64(lambda x: F.layer_norm(x, (D,), w.double(), b.double(), eps=EPS), (x,), (x_tan,))
    close(y, ref, dtype)
    close(y_tan, ref_tan, dtype)
    y, y_tan = norm_modulate(x, x_tan, EPS, out_dtype=torch.float32)  # the head's fp32 norm
    ref, ref_tan = jvp64(lambda x: F.layer_norm(x, (D,), eps=EPS), (x,), (x_tan,))
    close(y, ref, torch.float32)  # inputs exact in either dtype, outputs fp32: fp32 accuracy
    close(y_tan, ref_tan, torch.float32)


def rms_rope_oracle(w, cos, sin):
    def f(x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double()
        if cos is None:
            return y
        return apply_rope(y.unflatten(-1, (HEADS, HEAD_DIM)), cos.double(), sin.double()).flatten(-2)
    return f


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rope", [True, False])
def test_qk_norm_rope(dtype, rope):
    torch.manual_seed(2)
    x, x_tan = rnd(B, S, D, dtype=dtype, scale=2.0), rnd(B, S, D, dtype=dtype)
    w = rnd(D) + 1
    cos = sin = None
    if rope:  # random angles: every pair of every head rotates by its own angle
        angles = 6.0 * torch.rand(S, HEAD_DIM // 2)
        cos, sin = angles.cos(), angles.sin()
    y, y_tan = qk_norm_rope(x, x_tan, w, EPS, None if cos is None else (cos, sin))
    ref, ref_tan = jvp64(rms_rope_oracle(w, cos, sin), (x,), (x_tan,))
    close(y, ref, dtype)
    close(y_tan, ref_tan, dtype)
    y_only, none = qk_norm_rope(x, None, w, EPS, None if cos is None else (cos, sin))
    assert none is None and torch.equal(y_only, y)


def test_qk_norm_rope_real_tables_match_model_layout():
    """The model's own (cos, sin) for a 3-axis grid, against apply_rope of the PyTorch norm in fp64."""
    torch.manual_seed(3)
    grid = (2, 2, 3)
    s = grid[0] * grid[1] * grid[2]
    x, x_tan = rnd(B, s, D), rnd(B, s, D)
    w = rnd(D) + 1
    cos, sin = rope_cos_sin(grid, HEAD_DIM, dtype=torch.float32)
    y, y_tan = qk_norm_rope(x, x_tan, w, EPS, (cos, sin))
    ref, ref_tan = jvp64(rms_rope_oracle(w, cos, sin), (x,), (x_tan,))
    close(y, ref, torch.float32)
    close(y_tan, ref_tan, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_qk_norm_rope_tensor_parallel_split(dtype, with_tangent):
    """TP = 2 by hand: each rank's slice of the heads, its partial row sums, their sum (the
    all-reduce), then the norm and RoPE of the slice: together the whole-row result."""
    torch.manual_seed(7)
    x, x_tan = rnd(B, S, D, dtype=dtype, scale=2.0), rnd(B, S, D, dtype=dtype)
    w = rnd(D) + 1
    angles = 6.0 * torch.rand(S, HEAD_DIM // 2)
    rope = (angles.cos(), angles.sin())
    ref, ref_tan = jvp64(rms_rope_oracle(w, *rope), (x,), (x_tan,))
    cut = 2 * HEAD_DIM  # rank 0: 2 heads, rank 1: 3 heads
    slices = [slice(0, cut), slice(cut, D)]
    tan = (lambda sl: x_tan[..., sl]) if with_tangent else (lambda sl: None)
    sums = sum(row_sums(x[..., sl], tan(sl)) for sl in slices)
    assert sums.shape == (B, S, 2 if with_tangent else 1)
    parts = [qk_norm_rope(x[..., sl], tan(sl), w[sl], EPS, rope, full_size=D, sums=sums) for sl in slices]
    close(torch.cat([p[0] for p in parts], -1), ref, dtype)
    if with_tangent:
        close(torch.cat([p[1] for p in parts], -1), ref_tan, dtype)
    with pytest.raises(ValueError, match="needs the all-reduced row sums"):
        qk_norm_rope(x[..., :cut], None, w[:cut], EPS, rope, full_size=D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gelu_tanh(dtype):
    torch.manual_seed(4)
    u, u_tan = rnd(B, S, 3 * D + 5, dtype=dtype, scale=3.0), rnd(B, S, 3 * D + 5, dtype=dtype)  # ragged tail
    u[0, 0, :4] = torch.tensor([-30.0, 30.0, 0.0, -4.0]).to(dtype)  # tanh saturation and the origin
    y, y_tan = gelu_tanh(u, u_tan)
    ref, ref_tan = jvp64(lambda u: F.gelu(u, approximate="tanh"), (u,), (u_tan,))
    close(y, ref, dtype)
    close(y_tan, ref_tan, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual(dtype, per_token):
    torch.manual_seed(5)
    x, x_tan, a, a_tan = (rnd(B, S, D, dtype=dtype) for _ in range(4))
    (gate,), (gate_tan,) = modulation(per_token, 1), modulation(per_token, 1)
    y, y_tan = gated_residual(x, x_tan, a, a_tan, gate, gate_tan)
    ref, ref_tan = jvp64(lambda x, a, g: x + g * a, (x, a, gate), (x_tan, a_tan, gate_tan))
    close(y, ref, dtype)
    close(y_tan, ref_tan, dtype)
    y2, y2_tan = gated_residual(x, x_tan, a, a_tan, gate, None)  # a gate without tangent
    _, ref2_tan = jvp64(lambda x, a: x + gate.double() * a, (x, a), (x_tan, a_tan))
    assert torch.equal(y2, y)
    close(y2_tan, ref2_tan, dtype)


def test_mixed_dtypes_like_the_block():
    """bf16 residual stream and branch output, fp32 gate and fp32 tangents (the first block)."""
    torch.manual_seed(6)
    x, a = rnd(B, S, D, dtype=torch.bfloat16), rnd(B, S, D, dtype=torch.bfloat16)
    x_tan, a_tan = rnd(B, S, D), rnd(B, S, D, dtype=torch.bfloat16)
    (gate,), (gate_tan,) = modulation(False, 1), modulation(False, 1)
    y, y_tan = gated_residual(x, x_tan, a, a_tan, gate, gate_tan)
    ref, ref_tan = jvp64(lambda x, a, g: x + g * a, (x, a, gate), (x_tan, a_tan, gate_tan))
    close(y, ref, torch.bfloat16)
    close(y_tan, ref_tan, torch.float32)


def test_mode_switch():
    x = torch.randn(2, 3)
    with torch.no_grad():
        with fused_ops.fused_ops("auto"):
            assert not fused_ops.use_fused_ops(x)  # CPU tensors: PyTorch
        with fused_ops.fused_ops("on"):
            assert fused_ops.use_fused_ops(x, None)
            assert not fused_ops.use_fused_ops(x.double())  # fp64 oracle: always PyTorch
        with fused_ops.fused_ops("off"):
            assert not fused_ops.use_fused_ops(x)
    with fused_ops.fused_ops("on"):
        assert not fused_ops.use_fused_ops(x)  # autograd records this pass: PyTorch
    with pytest.raises(ValueError, match="fused tangent ops mode"):
        fused_ops.set_fused_ops("sometimes")


@pytest.mark.slow
def test_fused_ops_benchmark_tiny(tmp_path):
    """benchmarks/fused_tangent_ops.py runs end to end on its CPU path and reports sane errors."""
    import importlib.util
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("fused_bench", os.path.join(root, "benchmarks", "fused_tangent_ops.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("fused_tangent_ops_*.json")
    result = json.loads(path.read_text())
    assert [r["op"] for r in result["ops"]] == ["layernorm + modulate", "q/k rmsnorm + rope", "gelu-tanh",
                                                 "gated residual"]
    for r in result["ops"]:  # bf16 outputs (the interpreter truncates to bf16, the GPU rounds to nearest)
        assert 0 < r["fused_rel_err_vs_fp64"] < 1e-2 and r["fused_ms"] > 0
    assert set(result["whole_pass_ms"]) == {"tangent pass, fused ops on", "tangent pass, fused ops off",
                                            "fused vs PyTorch: rel diff of v, dv"}
