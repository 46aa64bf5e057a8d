"""Plain-math attention and its forward-mode tangent.

This is the oracle every fused kernel is compared against, and the CPU path of the
model. It materialises the full score matrix, so it is only for short sequences.
Layout follows the kernel API: q, k, v are [batch, seq, heads, head_dim].
"""

from __future__ import annotations

import torch

from .numerics import accumulate_dtype, resolve_softmax_scale


def attention_reference(q, k, v, softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(s q k^T) v, differentiable and `torch.func.jvp`-able. Returns [B, Sq, H, D]."""
    s = resolve_softmax_scale(q, softmax_scale)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * s
    p = torch.softmax(scores.to(accumulate_dtype(q)), dim=-1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def attention_with_tangent_reference(q, k, v, tq, tk=None, tv=None, softmax_scale: float | None = None,
                                     *, kv_len=None):
    """Attention and its tangent (docs/design.md §4.1), computed with full score matrices.

    Returns (out [B,Sq,H,D], tout [B,Sq,H,D], lse [B,H,Sq], tlse [B,H,Sq]). ``tk``/``tv`` of
    None mean zero key/value tangents (cross-attention to text). ``kv_len`` (int or int tensor
    [B]) excludes keys at positions >= kv_len; a row with no valid key returns out = tout = 0,
    lse = -inf, tlse = 0 (what the fused kernel returns, and what the chunk merge expects).
    """
    s = resolve_softmax_scale(q, softmax_scale)
    sd = accumulate_dtype(q)
    scores = (torch.einsum("bqhd,bkhd->bhqk", q, k) * s).to(sd)
    tscores = torch.einsum("bqhd,bkhd->bhqk", tq, k)
    if tk is not None:
        tscores = tscores + torch.einsum("bqhd,bkhd->bhqk", q, tk)
    tscores = (tscores * s).to(sd)
    if kv_len is not None:
        lim = torch.as_tensor(kv_len, device=scores.device).reshape(-1, 1, 1, 1)
        keep = torch.arange(scores.shape[-1], device=scores.device) < lim
        scores = scores.masked_fill(~keep, float("-inf"))
        tscores = tscores.masked_fill(~keep, 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1))
    p = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, p)  # rows with no valid key
    tlse = (p * tscores).sum(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), v)
    h = (p * tscores).to(q.dtype)
    tout = torch.einsum("bhqk,bkhd->bqhd", h, v)
    if tv is not None:
        tout = tout + torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), tv)
    tout = tout - tlse.transpose(1, 2).unsqueeze(-1).to(q.dtype) * out
    return out, tout, lse, tlse
