"""GPU checks of the attention-with-tangent kernel (bf16/fp16/fp32) against a float64 jvp oracle.

Run on a CUDA machine: ``pytest -q tests/gpu/test_attention_gpu.py``. The oracle is
``torch.func.jvp`` of plain-math attention (and its logsumexp) in float64 on the GPU. Where the
full [L, L] float64 score matrix would not fit, the oracle is evaluated on a random subset of
query rows against all keys (rows of attention are independent), so the kernel still runs at the
benchmark shape.
"""

import math
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from rcm_megatron.kernels import attention, attention_reference, merge_attention_chunks  # noqa: E402
from rcm_megatron.kernels.triton_attention import triton_attention_with_tangent  # noqa: E402


def oracle64(q, k, v, q_tan, k_tan=None, v_tan=None, rows=None, scale=None):
    q, k, v, q_tan = (x.double() for x in (q, k, v, q_tan))
    k_tan = torch.zeros_like(k) if k_tan is None else k_tan.double()
    v_tan = torch.zeros_like(v) if v_tan is None else v_tan.double()
    if rows is not None:
        q, q_tan = q[:, rows], q_tan[:, rows]
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])

    def f(q_, k_, v_):
        out = attention_reference(q_, k_, v_, scale)
        lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q_, k_) * s, dim=-1)
        return out, lse

    (o, lse), (o_tan, lse_tan) = torch.func.jvp(f, (q, k, v), (q_tan, k_tan, v_tan))
    return o, o_tan, lse, lse_tan


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite kernel output"
    return ((a - b).norm() / b.norm()).item()


def poisoned(q):
    B, S, H, _ = q.shape
    nan = float("nan")
    return (torch.full_like(q, nan), torch.full_like(q, nan),
            torch.full((B, H, S), nan, device=q.device), torch.full((B, H, S), nan, device=q.device))


def inputs(B, Sq, Sk, H, D, kvt, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    q, q_tan, k, v = r(B, Sq, H, D), r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    k_tan, v_tan = (r(B, Sk, H, D), r(B, Sk, H, D)) if kvt else (None, None)
    return q, k, v, q_tan, k_tan, v_tan


def check_case(args, tol, rows=None, config=None, **kw):
    res = triton_attention_with_tangent(*args, config=config, out=poisoned(args[0]), **kw)
    o, o_tan, lse, lse_tan = res
    if rows is not None:
        o, o_tan, lse, lse_tan = o[:, rows], o_tan[:, rows], lse[:, :, rows], lse_tan[:, :, rows]
    ro, ro_tan, rlse, rlse_tan = oracle64(*args, rows=rows)
    errs = dict(out=rel(o, ro), out_tan=rel(o_tan, ro_tan), lse=rel(lse, rlse), lse_tan=rel(lse_tan, rlse_tan))
    assert all(v < tol for v in errs.values()), errs
    return errs


# The default config (TMA K/V path on Hopper) and a pointer-load config, so both paths are checked.
POINTER_CFG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, tma=False)

CASES = [
    # name, B, Sq, Sk, H, D, kvt, dtype, rows-subset, tol
    ("self12_4096", 1, 4096, 4096, 12, 128, True, torch.bfloat16, None, 1e-2),
    ("self12_32760_rows", 1, 32760, 32760, 12, 128, True, torch.bfloat16, 384, 1e-2),
    ("self5_32760_rows_qonly", 1, 32760, 32760, 5, 128, False, torch.bfloat16, 384, 1e-2),
    ("cross_32760x512", 1, 32760, 512, 12, 128, False, torch.bfloat16, None, 1e-2),
    ("ragged_fp16_d64", 2, 1001, 1533, 3, 64, True, torch.float16, None, 1e-2),
    ("ragged_bf16_d32", 2, 777, 301, 2, 32, True, torch.bfloat16, None, 1e-2),
    ("fp32_d64", 1, 300, 211, 2, 64, True, torch.float32, None, 1e-5),
]


@pytest.mark.parametrize("name,B,Sq,Sk,H,D,kvt,dtype,nrows,tol", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("variant", ["default", "pointer"])
def test_against_float64(name, B, Sq, Sk, H, D, kvt, dtype, nrows, tol, variant):
    args = inputs(B, Sq, Sk, H, D, kvt, dtype, seed=sum(map(ord, name)))
    rows = None
    if nrows:
        g = torch.Generator(device="cuda").manual_seed(1)
        rows = torch.randperm(Sq, generator=g, device="cuda")[:nrows].sort().values
    cfg = None
    if variant == "pointer":
        if dtype == torch.float32 or D != 128:
            pytest.skip("pointer variant checked at the benchmark head dim only")
        cfg = POINTER_CFG
    check_case(args, tol, rows=rows, config=cfg)


def test_kv_len_and_merge_on_gpu():
    args = inputs(2, 700, 1200, 4, 128, True, torch.bfloat16, seed=3)
    q, k, v, q_tan, k_tan, v_tan = args
    lens = torch.tensor([1200, 0], device="cuda")
    a = triton_attention_with_tangent(q, k[:, :500], v[:, :500], q_tan, k_tan[:, :500], v_tan[:, :500])
    b = triton_attention_with_tangent(q, k[:, 500:], v[:, 500:], q_tan, k_tan[:, 500:], v_tan[:, 500:],
                                      kv_len=lens - 500)
    assert torch.isneginf(b[2][1]).all() and (b[1][1] == 0).all()
    merged = merge_attention_chunks([a, b])
    full_b0 = oracle64(*(None if x is None else x[:1] for x in args))
    for m, r in zip(merged, full_b0):
        assert rel(m[:1], r) < 1e-2
    only_a = oracle64(q[1:], k[1:, :500], v[1:, :500], q_tan[1:], k_tan[1:, :500], v_tan[1:, :500])
    for m, r in zip(merged, only_a):
        assert rel(m[1:], r) < 1e-2


def test_new_seq_len_does_not_recompile():
    q, k, v, q_tan, k_tan, v_tan = inputs(1, 4096, 4096, 12, 128, True, torch.bfloat16)
    triton_attention_with_tangent(q, k, v, q_tan, k_tan, v_tan)
    torch.cuda.synchronize()
    for L in (4099, 5000, 6151):
        a = inputs(1, L, L + 3, 12, 128, True, torch.bfloat16, seed=L)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        triton_attention_with_tangent(*a)
        torch.cuda.synchronize()
        assert time.perf_counter() - t0 < 2.0


def test_primal_attention_backward_through_sdpa():
    q, k, v, *_ = inputs(1, 1000, 1000, 4, 128, False, torch.bfloat16, seed=9)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    attention(q, k, v).float().square().sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    attention_reference(q64, k64, v64).square().sum().backward()
    for a, b in ((q, q64), (k, k64), (v, v64)):
        assert rel(a.grad, b.grad) < 2e-2
