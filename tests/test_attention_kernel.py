"""The Triton attention-with-tangent kernel against a float64 oracle (CPU, TRITON_INTERPRET=1).

The oracle is ``torch.func.jvp`` of plain-math attention (and of its logsumexp) in float64, not
the hand-written tangent reference. Outputs are written into NaN-poisoned buffers so an element
the kernel forgets to write fails the comparison. Small blocks (16/32) make every shape span
several query and key tiles, with ragged tails.
"""

import json
import math
import warnings

import pytest
import torch

from rcm_megatron.kernels import attention_backend, attention_reference, attention_with_tangent
from rcm_megatron.kernels import tuning
from rcm_megatron.kernels.triton_attention import triton_attention_with_tangent

SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
TMA = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, tma=True)


def oracle(q, k, v, q_tan, k_tan=None, v_tan=None, scale=None, kv_len=None):
    """float64 jvp of plain-math (out, lse); kv_len as int or per-batch list (0 allowed)."""
    q, k, v, q_tan = (x.double() for x in (q, k, v, q_tan))
    k_tan = torch.zeros_like(k) if k_tan is None else k_tan.double()
    v_tan = torch.zeros_like(v) if v_tan is None else v_tan.double()
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])

    def f(q_, k_, v_):
        out = attention_reference(q_, k_, v_, scale)
        lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q_, k_) * s, dim=-1)
        return out, lse

    B = q.shape[0]
    lens = [k.shape[1]] * B if kv_len is None else (
        [int(kv_len)] * B if not isinstance(kv_len, (list, tuple, torch.Tensor)) else [int(x) for x in kv_len]
    )
    res = []
    for b in range(B):
        n = min(lens[b], k.shape[1])
        sl = lambda x: x[b : b + 1]  # noqa: E731
        kl = lambda x: x[b : b + 1, :n]  # noqa: E731
        if n == 0:
            Sq, H, D = q.shape[1:]
            z = torch.zeros(1, Sq, H, D, dtype=torch.float64)
            ninf = torch.full((1, H, Sq), float("-inf"), dtype=torch.float64)
            res.append((z, z, ninf, torch.zeros(1, H, Sq, dtype=torch.float64)))
            continue
        (o, lse), (o_tan, lse_tan) = torch.func.jvp(f, (sl(q), kl(k), kl(v)), (sl(q_tan), kl(k_tan), kl(v_tan)))
        res.append((o, o_tan, lse, lse_tan))
    return tuple(torch.cat([r[i] for r in res]) for i in range(4))


def poisoned(q):
    B, Sq, H, D = q.shape
    return (
        torch.full_like(q, float("nan")),
        torch.full_like(q, float("nan")),
        torch.full((B, H, Sq), float("nan")),
        torch.full((B, H, Sq), float("nan")),
    )


def rel(a, b):
    """Relative error; -inf (fully masked rows of lse) must sit exactly where the oracle has it."""
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in kernel output (unwritten element?)"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b])
    a, b = a[~inf_a], b[~inf_b]
    if b.numel() == 0 or b.norm() == 0:
        return a.abs().max().item() if a.numel() else 0.0
    return ((a - b).norm() / b.norm()).item()


def run_kernel(q, k, v, q_tan, k_tan=None, v_tan=None, scale=None, config=SMALL, **kw):
    buf = poisoned(q)
    res = triton_attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, scale, config=config, out=buf, **kw)
    assert all(r is b for r, b in zip(res, buf))
    return res


def make(B, Sq, Sk, H, D, kvt, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, q_tan = r(B, Sq, H, D), r(B, Sq, H, D)
    k, v = r(B, Sk, H, D), r(B, Sk, H, D)
    k_tan, v_tan = (r(B, Sk, H, D), r(B, Sk, H, D)) if kvt else (None, None)
    return q, k, v, q_tan, k_tan, v_tan


def check(got, want, tol=2e-5):
    o, o_tan, lse, lse_tan = got
    ro, ro_tan, rlse, rlse_tan = want
    assert rel(o, ro) < tol
    assert rel(o_tan, ro_tan) < tol
    assert rel(lse, rlse) < tol
    assert rel(lse_tan, rlse_tan) < tol


CASES = [
    # B, Sq, Sk, H, D, kv tangent, config
    (1, 16, 16, 1, 16, True, SMALL),
    (2, 37, 53, 2, 32, True, SMALL),  # ragged, seq_q != seq_k
    (1, 50, 19, 3, 64, True, SMALL),  # seq_k < seq_q, single partial KV tile
    (2, 33, 70, 2, 32, False, SMALL),  # zero KV tangents (4-matmul path)
    (1, 64, 48, 2, 16, False, dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)),
    (1, 21, 45, 2, 24, True, SMALL),  # head dim not a power of two (padded to 32)
    (1, 29, 31, 1, 128, True, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
    # tensor-descriptor (TMA) K/V path: ragged tails cross into the next batch's rows
    (2, 37, 53, 2, 32, True, TMA),
    (3, 20, 21, 1, 16, False, TMA),
]


@pytest.mark.parametrize("B,Sq,Sk,H,D,kvt,cfg", CASES)
def test_matches_float64_jvp(B, Sq, Sk, H, D, kvt, cfg):
    args = make(B, Sq, Sk, H, D, kvt, seed=Sq * 7 + Sk)
    check(run_kernel(*args, config=cfg), oracle(*args))


def test_random_shapes():
    g = torch.Generator().manual_seed(123)
    for trial in range(4):
        B = int(torch.randint(1, 3, (), generator=g))
        Sq = int(torch.randint(1, 60, (), generator=g))
        Sk = int(torch.randint(1, 60, (), generator=g))
        H = int(torch.randint(1, 3, (), generator=g))
        D = [16, 32, 64][int(torch.randint(0, 3, (), generator=g))]
        kvt = bool(torch.randint(0, 2, (), generator=g))
        args = make(B, Sq, Sk, H, D, kvt, seed=1000 + trial)
        check(run_kernel(*args), oracle(*args))


def test_softmax_scale_and_large_logits():
    args = list(make(1, 40, 40, 2, 32, True, seed=5))
    args[0] = args[0] * 6.0  # peaked softmax: exercises the running-max rescale
    check(run_kernel(*args, scale=0.37), oracle(*args, scale=0.37))


@pytest.mark.parametrize("tma", [True, False])
def test_growing_row_max_rescales(tma):
    """Key norms grow along the sequence, so row maxima jump by > 2^8 from tile to tile."""
    q, k, v, q_tan, k_tan, v_tan = make(1, 24, 80, 2, 16, True, seed=21)
    k = k * torch.linspace(0.05, 6.0, 80).reshape(1, 80, 1, 1)
    cfg = dict(SMALL, tma=tma)
    check(run_kernel(q, k, v, q_tan, k_tan, v_tan, config=cfg), oracle(q, k, v, q_tan, k_tan, v_tan))


def test_partial_kv_tangent_is_zero_filled():
    q, k, v, q_tan, k_tan, v_tan = make(1, 20, 24, 1, 16, True, seed=9)
    check(run_kernel(q, k, v, q_tan, k_tan, None), oracle(q, k, v, q_tan, k_tan, None))


def test_strided_inputs():
    """q/k/v as views into a packed [B, S, 3, H, D] projection, tangents likewise."""
    B, S, H, D = 1, 35, 2, 32
    g = torch.Generator().manual_seed(3)
    qkv, qkv_tan = torch.randn(B, S, 3, H, D, generator=g), torch.randn(B, S, 3, H, D, generator=g)
    q, k, v = qkv.unbind(2)
    q_tan, k_tan, v_tan = qkv_tan.unbind(2)
    assert not q.is_contiguous()
    check(run_kernel(q, k, v, q_tan, k_tan, v_tan), oracle(q, k, v, q_tan, k_tan, v_tan))


@pytest.mark.parametrize("kv_len", [20, 16, 0, 100])
def test_kv_len_int(kv_len):
    args = make(2, 23, 37, 2, 16, True, seed=kv_len)
    check(run_kernel(*args, kv_len=kv_len), oracle(*args, kv_len=kv_len))


def test_kv_len_tma_ignores_nan_padding(monkeypatch):
    """Padded keys past kv_len may hold NaN: the TMA path must zero them, not multiply by 0."""
    import rcm_megatron.kernels.triton_attention as ta

    made = []
    orig = ta._kv_descriptor
    monkeypatch.setattr(ta, "_kv_descriptor", lambda *a: made.append(1) or orig(*a))
    q, k, v, q_tan, k_tan, v_tan = make(2, 23, 37, 2, 16, True, seed=12)
    for x in (k, v, k_tan, v_tan):
        x[:, 30:] = float("nan")
    want = oracle(q, k, v, q_tan, k_tan, v_tan, kv_len=30)
    check(run_kernel(q, k, v, q_tan, k_tan, v_tan, kv_len=30, config=TMA), want)
    assert len(made) == 4  # the descriptor path really ran
    check(run_kernel(q, k, v, q_tan, k_tan, v_tan, kv_len=30), want)


def test_kv_len_tensor_with_fully_masked_batch():
    args = make(3, 19, 40, 2, 16, True, seed=11)
    lens = torch.tensor([40, 0, 17])
    got = run_kernel(*args, kv_len=lens)
    o, o_tan, lse, lse_tan = got
    assert torch.isneginf(lse[1]).all() and (o[1] == 0).all() and (o_tan[1] == 0).all()
    assert (lse_tan[1] == 0).all()
    want = oracle(*args, kv_len=lens)
    keep = [0, 2]
    check(tuple(x[keep] for x in got), tuple(x[keep] for x in want))


def test_empty_keys():
    q, k, v, q_tan, k_tan, v_tan = make(1, 18, 0, 2, 16, True, seed=2)
    o, o_tan, lse, lse_tan = run_kernel(q, k, v, q_tan, k_tan, v_tan)
    assert (o == 0).all() and (o_tan == 0).all() and (lse_tan == 0).all() and torch.isneginf(lse).all()


def test_reference_agrees_with_oracle_on_kv_len():
    args = make(2, 12, 20, 1, 16, True, seed=4)
    got = attention_with_tangent(*args, kv_len=torch.tensor([7, 0]))
    want = oracle(*args, kv_len=[7, 0])
    assert torch.isneginf(got[2][1]).all() and not torch.isnan(got[1]).any()
    check(tuple(x[:1] for x in got), tuple(x[:1] for x in want), tol=1e-6)


def test_dispatcher_triton_backend_and_fallback():
    args = make(1, 20, 20, 1, 16, True, seed=6)
    with attention_backend("triton"):
        check(attention_with_tangent(*args), oracle(*args))
    # head dim 160 is beyond the kernel: the dispatcher must fall back to the reference cleanly
    big = make(1, 8, 8, 1, 160, True, seed=7)
    with attention_backend("triton"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = attention_with_tangent(*big)
    assert any("reference" in str(x.message) for x in w)
    check(got, oracle(*big), tol=1e-6)


def test_config_cache_has_no_seq_len_and_round_trips(tmp_path):
    tuning.clear_cache()
    cfg = tuning.get_config(None, 64, torch.bfloat16, True)
    key = tuning.config_key(tuning.device_name(None), 64, torch.bfloat16, True)
    assert "|d64|bfloat16|kvt" in key
    tuning.set_config(None, 64, torch.bfloat16, True, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3))
    path = tmp_path / "tune.json"
    tuning.save_tuning(str(path))
    data = json.loads(path.read_text())
    assert data[key] == dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, tma=False)
    tuning.clear_cache()
    assert tuning.get_config(None, 64, torch.bfloat16, True) == cfg
    assert tuning.load_tuning(str(path)) == 1
    assert tuning.get_config(None, 64, torch.bfloat16, True).BLOCK_N == 32
    # files written by other versions may carry fields this one does not know
    data[key]["future_knob"] = 1
    path.write_text(json.dumps(data))
    tuning.clear_cache()
    assert tuning.load_tuning(str(path)) == 1
    assert tuning.get_config(None, 64, torch.bfloat16, True).BLOCK_N == 32
    tuning.clear_cache()


def test_seq_lens_are_not_specialised():
    """A new sequence length must reuse the compiled kernel: lengths are runtime ints that
    Triton does not specialise on, and no constexpr depends on them."""
    import inspect

    from rcm_megatron.kernels.triton_attention import _attn_tangent_fwd as f

    if hasattr(f, "params"):  # JITFunction (GPU)
        dns = {p.name for p in f.params if p.do_not_specialize}
        constexprs = {p.name for p in f.params if p.is_constexpr}
    else:  # InterpretedFunction (TRITON_INTERPRET=1)
        dns = set(f.kwargs["do_not_specialize"])
        sig = inspect.signature(f.fn)
        constexprs = {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}
    assert {"seq_q", "seq_k", "kv_rows"} <= dns
    assert constexprs == {"HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "HAS_KV_TANGENT", "HAS_KV_LEN",
                          "USE_TMA", "DOT_PRECISION"}
