"""Attention of local queries to one key/value chunk, forward and backward: the per-chunk math of
ring attention (parallel/ring_attention.py moves the chunks; this computes on them).

Forward returns the chunk's (out, lse); the chunks are merged with ``merge.merge_attention_primal``.
Backward takes the *merged* out and lse of all chunks (so P = exp(S - lse) is the global softmax
restricted to this chunk) and delta = rowsum(dO * O), as FlashAttention's backward does, and
returns this chunk's dq, dk, dv.

On CUDA in half precision each chunk runs FlashAttention (aten's flash forward/backward, which
return and take the lse). Elsewhere (CPU, fp32, fp64 oracle) it is plain math in blocks of query
rows, in fp32 (fp64 for fp64 inputs). If the flash call fails once (an unsupported build or
shape) every later chunk uses plain math, with one warning; ``flash_failures`` records why.
"""

from __future__ import annotations

import warnings

import torch

from .dispatch import _backend_for
from .numerics import accumulate_dtype

_Q_BLOCK_ELEMENTS = 1 << 26  # plain-math path: score rows per block x keys x heads

flash_failures: list[str] = []


def _use_flash(q) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and _backend_for(q) != "reference")


def _q_blocks(q, nk):
    rows = max(1, _Q_BLOCK_ELEMENTS // max(1, nk * q.shape[2]))
    return range(0, q.shape[1], rows), rows


def chunk_attention_forward(q, k, v, scale):
    """Attention of q [B, Sq, H, D] to one key chunk: (out [B, Sq, H, D], lse [B, H, Sq], what the
    backward needs: FlashAttention's auxiliary outputs, or None for the plain-math path)."""
    if _use_flash(q) and not flash_failures:
        try:
            r = torch.ops.aten._scaled_dot_product_flash_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale)
            return r[0].transpose(1, 2), r[1][..., :q.shape[1]], tuple(r[2:8])
        except RuntimeError as e:  # an unsupported build or shape: plain math from now on, said once
            flash_failures.append(str(e))
            warnings.warn(f"ring attention: FlashAttention per chunk failed ({e}); using plain math in query blocks",
                          stacklevel=2)
    ad = accumulate_dtype(q)
    starts, rows = _q_blocks(q, k.shape[1])
    outs, lses = [], []
    kf, vf = k.to(ad), v.to(ad)
    for i in starts:
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, i:i + rows].to(ad), kf) * scale
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, vf))
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, -1), None


def chunk_attention_backward(do, q, k, v, out, lse, delta, scale, aux):
    """dq, dk, dv of one key chunk, with the *merged* out and lse of all chunks (so P is the
    global softmax restricted to this chunk). delta = rowsum(dO * O) [B, H, Sq]; ``aux`` is what
    ``chunk_attention_forward`` returned for this chunk."""
    if aux is not None:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
            lse, *aux[:4], 0.0, False, *aux[4:6], scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    ad = accumulate_dtype(q)
    kf, vf = k.to(ad), v.to(ad)
    starts, rows = _q_blocks(q, k.shape[1])
    dqs, dk, dv = [], torch.zeros_like(kf), torch.zeros_like(vf)
    for i in starts:
        qb, dob = q[:, i:i + rows].to(ad), do[:, i:i + rows].to(ad)
        s = torch.einsum("bqhd,bkhd->bhqk", qb, kf) * scale
        p = torch.exp(s - lse[..., i:i + rows].unsqueeze(-1))
        dv += torch.einsum("bhqk,bqhd->bkhd", p, dob)
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", dob, vf) - delta[..., i:i + rows].unsqueeze(-1))
        dqs.append(torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale)
        dk += torch.einsum("bhqk,bqhd->bkhd", ds, qb) * scale
    return torch.cat(dqs, 1), dk, dv
