"""Merging partial attention over key chunks (ring attention) against the float64 jvp oracle.

Chunks are computed by the Triton kernel under TRITON_INTERPRET=1 (fp32) into NaN-poisoned
buffers, then merged with ``merge_attention_chunks`` and with the pairwise in-place
``merge_attention_pair``; both must equal attention over all keys. Fully masked chunks (empty,
or kv_len = 0 padding) must get weight 0 and produce no NaN anywhere.
"""

import pytest
import torch

from rcm_megatron.kernels import (
    attention_with_tangent_reference,
    finalize_attention_merge,
    merge_attention_chunks,
    merge_attention_pair,
)
from test_attention_kernel import check, make, oracle, run_kernel


def split_points(Sk, n, g):
    cuts = sorted(torch.randint(0, Sk + 1, (n - 1,), generator=g).tolist())
    return [0] + cuts + [Sk]


def chunk_results(args, bounds, kernel=True, kv_len=None):
    q, k, v, q_tan, k_tan, v_tan = args
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sl = lambda x: None if x is None else x[:, lo:hi]  # noqa: E731
        if kernel:
            parts.append(run_kernel(q, sl(k), sl(v), q_tan, sl(k_tan), sl(v_tan)))
        else:
            parts.append(attention_with_tangent_reference(q, sl(k), sl(v), q_tan, sl(k_tan), sl(v_tan)))
    return parts


def ring_merge(parts):
    acc = None
    for p in parts:
        acc = merge_attention_pair(acc, p, out=acc)
    return finalize_attention_merge(acc, parts[0][0].dtype)


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 4])
@pytest.mark.parametrize("kvt", [True, False])
def test_merge_matches_full_attention(n_chunks, kvt):
    g = torch.Generator().manual_seed(n_chunks * 10 + kvt)
    args = make(2, 21, 45, 2, 16, kvt, seed=n_chunks + 17 * kvt)
    bounds = split_points(45, n_chunks, g)
    parts = chunk_results(args, bounds)
    want = oracle(*args)
    check(merge_attention_chunks(parts), want)
    check(ring_merge(parts), want)


def test_merge_with_empty_and_padded_chunks():
    """Chunk 2 is empty (seq_k = 0) and chunk 4 is pure padding (kv_len = 0): both lse = -inf."""
    args = make(1, 19, 40, 2, 16, True, seed=3)
    q, k, v, q_tan, k_tan, v_tan = args
    parts = chunk_results(args, [0, 13, 13, 40])
    pad = lambda x: torch.randn(1, 16, 2, 16)  # noqa: E731  (garbage keys that must not count)
    parts.append(run_kernel(q, pad(k), pad(v), q_tan, pad(k_tan), pad(v_tan), kv_len=0))
    assert torch.isneginf(parts[1][2]).all() and torch.isneginf(parts[3][2]).all()
    want = oracle(*args)
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [1, 3, 2, 0]):
        ps = [parts[i] for i in order]
        check(merge_attention_chunks(ps), want)
        check(ring_merge(ps), want)


def test_partially_padded_tail_chunk():
    """Last ring chunk holds 10 real keys then padding, excluded with kv_len."""
    args = make(2, 17, 30, 1, 32, True, seed=8)
    q, k, v, q_tan, k_tan, v_tan = args
    parts = chunk_results(args, [0, 20])
    tail = [torch.cat([x[:, 20:], torch.randn(2, 6, 1, 32)], dim=1) for x in (k, v, k_tan, v_tan)]
    parts.append(run_kernel(q, *tail[:2], q_tan, *tail[2:], kv_len=10))
    want = oracle(*args)
    check(merge_attention_chunks(parts), want)
    check(ring_merge(parts), want)


def test_masked_chunk_garbage_never_leaks():
    """A chunk with lse = -inf may hold anything (NaN, inf) in out/out_tan/lse_tan: weight 0, no NaN."""
    args = make(1, 12, 24, 2, 16, True, seed=4)
    parts = chunk_results(args, [0, 10, 24], kernel=False)
    B, S, H, D = parts[0][0].shape
    nan = float("nan")
    junk = (torch.full((B, S, H, D), nan), torch.full((B, S, H, D), float("inf")),
            torch.full((B, H, S), float("-inf")), torch.full((B, H, S), nan))
    want = oracle(*args)
    for ps in ([junk] + parts, parts[:1] + [junk] + parts[1:], parts + [junk]):
        check(merge_attention_chunks(ps), want, tol=1e-6)
        check(ring_merge(ps), want, tol=1e-6)


def test_rows_masked_in_every_chunk():
    """Per-row: batch 1 has no valid key in any chunk -> out = out_tan = 0, lse = -inf, lse_tan = 0."""
    args = make(2, 9, 20, 1, 16, True, seed=5)
    q, k, v, q_tan, k_tan, v_tan = args
    parts = []
    for lo, hi in ((0, 8), (8, 20)):
        sl = lambda x: x[:, lo:hi]  # noqa: E731
        lens = torch.tensor([hi - lo, 0])
        parts.append(run_kernel(q, sl(k), sl(v), q_tan, sl(k_tan), sl(v_tan), kv_len=lens))
    for res in (merge_attention_chunks(parts), ring_merge(parts)):
        o, o_tan, lse, lse_tan = res
        for x in res:
            assert not torch.isnan(x).any()
        assert torch.isneginf(lse[1]).all() and (o[1] == 0).all() and (o_tan[1] == 0).all()
        assert (lse_tan[1] == 0).all()
        want = oracle(*(x[:1] for x in args))
        check(tuple(x[:1] for x in res), want)


def test_pair_in_place_and_dtype():
    args = make(1, 10, 16, 1, 16, True, seed=6)
    a, b = chunk_results(args, [0, 7, 16], kernel=False)
    acc = tuple(x.clone().float() for x in a)
    ptrs = [x.data_ptr() for x in acc]
    res = merge_attention_pair(acc, b, out=acc)
    assert [x.data_ptr() for x in res] == ptrs
    check(res, oracle(*args), tol=1e-6)
    bf = merge_attention_chunks([tuple(x.clone() for x in a), b], out_dtype=torch.bfloat16)
    assert bf[0].dtype == torch.bfloat16 and bf[2].dtype == torch.float32

