"""Merge partial attention results over key/value chunks (ring attention, split-KV).

Each chunk is ``(out, out_tan, lse, lse_tan)`` as returned by ``attention_with_tangent`` on a subset of
the keys: out/out_tan [B, S, H, D], lse/lse_tan fp32 [B, H, S]. The merged result equals attention over
the union of the keys (docs/design.md §4.3):

    lse = logsumexp_i lse_i,  w_i = exp(lse_i - lse),  O = sum w_i O_i,
    lse_tan = sum w_i lse_tan_i,    O_tan = sum w_i (O_tan_i + (lse_tan_i - lse_tan) O_i).

Pairwise, with s = sigmoid(lse_b - lse_a): O = O_a + s (O_b - O_a), lse_tan likewise, and
O_tan = (1-s) O_tan_a + s O_tan_b + s (1-s) (lse_tan_b - lse_tan_a)(O_b - O_a).

A fully masked chunk (no valid key for a row: lse = -inf) gets weight exactly 0, and nothing it
holds (out, out_tan, lse_tan, even NaN) reaches the result; a row masked in every chunk merges to
out = out_tan = 0, lse = -inf, lse_tan = 0. All arithmetic is fp32 (or fp64 for fp64 inputs).

For ring attention keep an fp32 running state and fold each arriving chunk into it in place:

    acc = None
    for step in range(cp):
        part = attention_with_tangent(q, k_i, v_i, q_tan, k_tan_i, v_tan_i, kv_len=...)
        acc = merge_attention_pair(acc, part, out=acc)   # acc None -> fp32 copy of part
    out, out_tan, lse, lse_tan = finalize_attention_merge(acc, q.dtype)

The with-grad ring (no tangents; every chunk it merges has a real key) folds primal-only chunks
with ``merge_attention_primal``: O = sum w_i O_i with w_i = exp(lse_i - lse), the first line above.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .numerics import accumulate_dtype

Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _rows(stat: torch.Tensor) -> torch.Tensor:
    """[B, H, S] statistic -> [B, S, H, 1] to broadcast against [B, S, H, D]."""
    return stat.transpose(1, 2).unsqueeze(-1)


def _weighted(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w * x with 0 wherever w == 0, whatever x holds there (inf, NaN)."""
    return torch.where(w > 0, w * x, torch.zeros((), dtype=w.dtype, device=w.device))


def _check(chunk: Chunk) -> None:
    out, out_tan, lse, lse_tan = chunk
    if out.dim() != 4 or out_tan.shape != out.shape:
        raise ValueError("out/out_tan must be [B, S, H, D] tensors of one shape")
    B, S, H, _ = out.shape
    if lse.shape != (B, H, S) or lse_tan.shape != (B, H, S):
        raise ValueError(f"lse/lse_tan must be [B, H, S] = {(B, H, S)}, got {tuple(lse.shape)}")


def merge_attention_chunks(chunks: Sequence[Chunk], out_dtype: torch.dtype | None = None) -> Chunk:
    """Merge a list of partial (out, out_tan, lse, lse_tan) over disjoint key chunks: the chunks folded
    one by one with ``merge_attention_pair``.

    Returns (out, out_tan, lse, lse_tan) with out/out_tan in ``out_dtype`` (default: the first chunk's
    out dtype) and lse/lse_tan in fp32 (fp64 if the inputs are fp64).
    """
    if len(chunks) == 0:
        raise ValueError("merge_attention_chunks needs at least one chunk")
    out_dtype = out_dtype or chunks[0][0].dtype
    acc = None
    for c in chunks:
        acc = merge_attention_pair(acc, c)
    out, out_tan, lse, lse_tan = acc
    return out.to(out_dtype), out_tan.to(out_dtype), lse, lse_tan


def merge_attention_pair(a: Chunk | None, b: Chunk, out: Chunk | None = None) -> Chunk:
    """Merge two partial results; ``out`` (4 tensors, may be ``a`` itself) receives the result.

    With ``a=None`` returns a copy of ``b`` in fp32 (the start of a ring accumulation), written
    into ``out`` if given. Computation is in fp32 (fp64 for fp64 inputs); if ``out`` is None the
    result is returned in that precision. Use ``finalize_attention_merge`` to cast at the end.
    """
    _check(b)
    ad = accumulate_dtype(b[0])
    if a is None:
        res = tuple(x.to(ad, copy=True) for x in b)  # never alias the caller's chunk
        # a row masked in b: canonical zeros, whatever b held there
        empty = torch.isneginf(res[2])
        res = (
            torch.where(_rows(empty), 0.0, res[0]),
            torch.where(_rows(empty), 0.0, res[1]),
            res[2],
            torch.where(empty, 0.0, res[3]),
        )
    else:
        _check(a)
        if a[0].shape != b[0].shape:
            raise ValueError("chunks to merge must have one shape")
        o_a, out_tan_a, lse_a, lse_tan_a = (x.to(ad) for x in a)
        o_b, out_tan_b, lse_b, lse_tan_b = (x.to(ad) for x in b)
        ninf_a, ninf_b = torch.isneginf(lse_a), torch.isneginf(lse_b)
        both = ninf_a & ninf_b
        diff = torch.where(both, 0.0, lse_b - lse_a)  # +inf / -inf when one side is masked
        s_b = torch.where(both, 0.0, torch.sigmoid(diff))
        s_a = torch.where(both, 0.0, torch.sigmoid(-diff))
        lse = torch.where(both, float("-inf"), torch.logaddexp(lse_a, lse_b))
        lse_tan = _weighted(s_a, lse_tan_a) + _weighted(s_b, lse_tan_b)
        ra, rb = _rows(s_a), _rows(s_b)
        o = _weighted(ra, o_a) + _weighted(rb, o_b)
        cross = _rows(s_a * s_b)
        corr = _weighted(cross, _rows(lse_tan_b - lse_tan_a) * (o_b - o_a))
        t = _weighted(ra, out_tan_a) + _weighted(rb, out_tan_b) + corr
        res = (o, t, lse, lse_tan)
    if out is None:
        return res
    for dst, src in zip(out, res):
        dst.copy_(src)
    return out


def finalize_attention_merge(acc: Chunk, out_dtype: torch.dtype) -> Chunk:
    """Cast a merged fp32 state to (out, out_tan) in ``out_dtype`` and lse/lse_tan in fp32."""
    out, out_tan, lse, lse_tan = acc
    return out.to(out_dtype), out_tan.to(out_dtype), lse.float(), lse_tan.float()


def merge_attention_primal(acc: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor,
                           lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one key chunk's primal (out [B, S, H, D], lse [B, H, S]) into the running (out, lse)
    of the chunks merged so far (``acc`` None: a copy of this chunk). fp32 (fp64 for fp64 inputs).
    The chunk must hold at least one key for every row (lse finite): no masking is done here."""
    out = out.to(accumulate_dtype(out))
    lse = lse.to(out.dtype)
    if acc is None:
        return out.clone(), lse.clone()
    o_a, lse_a = acc
    new = torch.logaddexp(lse_a, lse)
    return o_a * _rows(torch.exp(lse_a - new)) + out * _rows(torch.exp(lse - new)), new
