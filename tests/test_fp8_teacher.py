"""--fp8-teacher: the frozen teacher's block linears in FP8 (row-wise scales, torch._scaled_mm).

Checked against float64 arithmetic on the quantized values (the product itself is exact up to the
bf16 output), and the whole teacher's output against the unquantized one (the quantization error,
which the benchmark reports at Wan width on the GPU)."""

import pytest
import torch

from rcm_megatron.kernels.fp8 import FP8_MAX, fp8_linear, quantize_rows
from rcm_megatron.models import WanDiT, preset


def test_rowwise_quantization_and_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-2, 2, 64)  # rows of very different scale
    w = torch.randn(48, 64, generator=g)
    b = torch.randn(48, generator=g)
    wq, ws = quantize_rows(w)
    assert wq.dtype == torch.float8_e4m3fn and ws.shape == (48, 1)
    assert (wq.float().abs().amax(dim=1) == FP8_MAX).all()  # each row uses the full range
    y = fp8_linear(x, wq, ws, b)
    xq, xs = quantize_rows(x.reshape(-1, 64))
    exact = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t() + b.double()
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 48)
    torch.testing.assert_close(y.double().reshape(-1, 48), exact, rtol=1e-2, atol=1e-2)
    rel = (y.double().reshape(-1, 48) - (x.reshape(-1, 64).double() @ w.double().t() + b.double())).norm() / exact.norm()
    assert rel < 0.05  # e4m3 keeps ~3 significant bits per element; errors average out over K


def test_fp8_teacher_close_to_the_full_teacher_and_primal_only():
    cfg = preset("tiny")
    ref, q = WanDiT(cfg).eval(), WanDiT(cfg).eval()
    n = q.quantize_fp8()
    per_block = 4 + 4 + 2  # self q,k,v,o; cross q,k,v,o; ffn fc1, fc2
    assert n == per_block * cfg.num_layers
    assert sum(p.numel() for p in q.parameters()) < sum(p.numel() for p in ref.parameters()) / 2
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 7, cfg.text_dim, generator=g)
    t = torch.tensor([200.0, 800.0])
    with torch.no_grad():
        v_ref, v = ref(x, t, ctx), q(x, t, ctx)
        rel = ((v.float() - v_ref).norm() / v_ref.norm()).item()
    assert 0 < rel < 0.05, rel
    with pytest.raises(RuntimeError, match="no tangent pass"):
        q.forward_with_tangent(x, t, ctx, x, torch.ones(2))
