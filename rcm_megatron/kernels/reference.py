"""Plain-math attention and its forward-mode tangent.

This is the oracle every fused kernel is compared against, and the CPU path of the
model. It materialises the score matrix; above ``MAX_SCORES`` elements the tangent reference
runs in query chunks (query rows are independent, so chunking changes nothing but peak memory),
which lets an fp32 reference pass run at 32K tokens (benchmarks/numerics.py).
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


MAX_SCORES = 2**29  # score-matrix elements per chunk (2 GiB in fp32)


def attention_with_tangent_reference(q, k, v, q_tan, k_tan=None, v_tan=None, softmax_scale: float | None = None,
                                     *, kv_len=None):
    """Attention and its tangent (docs/design.md §4.1), computed with full score matrices.

    Returns (out [B,Sq,H,D], out_tan [B,Sq,H,D], lse [B,H,Sq], lse_tan [B,H,Sq]). ``k_tan``/``v_tan`` of
    None mean zero key/value tangents (cross-attention to text). ``kv_len`` (int or int tensor
    [B]) excludes keys at positions >= kv_len; a row with no valid key returns out = out_tan = 0,
    lse = -inf, lse_tan = 0 (what the fused kernel returns, and what the chunk merge expects).
    """
    B, Sq, H, _ = q.shape
    rows = max(1, MAX_SCORES // max(1, B * H * k.shape[1]))
    if Sq <= rows:
        return _attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, softmax_scale, kv_len)
    parts = [_attention_with_tangent(q[:, i:i + rows], k, v, q_tan[:, i:i + rows], k_tan, v_tan, softmax_scale, kv_len)
             for i in range(0, Sq, rows)]
    return (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1),
            torch.cat([p[2] for p in parts], 2), torch.cat([p[3] for p in parts], 2))


def _attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, softmax_scale, kv_len):
    s = resolve_softmax_scale(q, softmax_scale)
    sd = accumulate_dtype(q)
    scores = (torch.einsum("bqhd,bkhd->bhqk", q, k) * s).to(sd)
    scores_tan = torch.einsum("bqhd,bkhd->bhqk", q_tan, k)
    if k_tan is not None:
        scores_tan = scores_tan + torch.einsum("bqhd,bkhd->bhqk", q, k_tan)
    scores_tan = (scores_tan * s).to(sd)
    if kv_len is not None:
        lim = torch.as_tensor(kv_len, device=scores.device).reshape(-1, 1, 1, 1)
        keep = torch.arange(scores.shape[-1], device=scores.device) < lim
        scores = scores.masked_fill(~keep, float("-inf"))
        scores_tan = scores_tan.masked_fill(~keep, 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1))
    p = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, p)  # rows with no valid key
    lse_tan = (p * scores_tan).sum(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), v)
    h = (p * scores_tan).to(q.dtype)
    out_tan = torch.einsum("bhqk,bkhd->bqhd", h, v)
    if v_tan is not None:
        out_tan = out_tan + torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), v_tan)
    out_tan = out_tan - lse_tan.transpose(1, 2).unsqueeze(-1).to(q.dtype) * out
    return out, out_tan, lse, lse_tan
