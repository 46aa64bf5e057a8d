"""Ring attention over a process group: key/value chunks travel around the ring, each rank
attends its queries to every chunk as it arrives and merges the partial results.

This module is the communication: who sends to whom, when a transfer is posted and waited for
(the next chunk's isend/irecv is posted before the current chunk is computed, so on GPU the NCCL
transfer overlaps the attention), and how the dK, dV accumulators travel back to their owners.
The attention of one chunk and the merge are kernels/ (``kernels.chunk_attention``,
``kernels.merge``), see docs/design.md §4.

``valid[j]`` is the number of real keys in the chunk of group rank j: its padded tail is cut off
(with-grad path) or masked with the kernel's ``kv_len`` (tangent path); a chunk with no real key
is skipped. The tangent pass is forward-only (no graph). The with-grad primal ring is an autograd
Function whose backward re-visits the chunks with the merged (global) lse and output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels.chunk_attention import chunk_attention_backward, chunk_attention_forward
from ..kernels.dispatch import attention_with_tangent
from ..kernels.merge import finalize_attention_merge, merge_attention_pair, merge_attention_primal
from ..kernels.numerics import accumulate_dtype

# ------------------------------------------------------------------ ring communication


class _Ring:
    """Neighbours of this rank in a process group seen as a ring."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def chunk_at(self, step: int) -> int:
        """Group rank whose key/value chunk this rank holds at ``step``."""
        return (self.rank - step) % self.size

    def shift(self, send: torch.Tensor, tag: int = 0) -> "_Pending":
        """Post: send ``send`` to the next rank, receive the previous rank's into a new buffer."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        return _Pending(dist.batch_isend_irecv(ops), recv, send)


class _Pending:
    def __init__(self, works, recv, send):
        self.works, self.recv, self.send = works, recv, send

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        self.send = None
        return self.recv


# ------------------------------------------------------------------ ring attention


class _RingAttention(torch.autograd.Function):
    """Primal attention of local queries to key/value chunks passed around a ring.

    ``valid[j]``: real keys in the chunk of group rank j (its padded tail is cut off; an empty
    chunk is skipped). Backward: the same ring again; dQ accumulates locally, each chunk's
    dK, dV accumulator travels with the chunk and arrives home after a full turn.
    """

    @staticmethod
    def forward(ctx, q, k, v, group, valid, scale):
        ring = _Ring(group)
        kv = torch.stack([k, v])
        acc, aux = None, {}
        for step in range(ring.size):
            pending = ring.shift(kv) if step < ring.size - 1 else None  # overlaps the compute below
            j = ring.chunk_at(step)
            n = valid[j]
            if n > 0:
                o_j, lse_j, aux[j] = chunk_attention_forward(q, kv[0, :, :n], kv[1, :, :n], scale)
                acc = merge_attention_primal(acc, o_j, lse_j)
            if pending is not None:
                kv = pending.wait()
        out, lse = acc[0].to(q.dtype), acc[1].to(accumulate_dtype(q)).contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.valid, ctx.scale, ctx.aux = group, valid, scale, aux
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        ring, valid, scale = _Ring(ctx.group), ctx.valid, ctx.scale
        do = do.contiguous()
        ad = accumulate_dtype(q)
        delta = (do.to(ad) * out.to(ad)).sum(-1).transpose(1, 2)  # [B, H, Sq]
        dq = torch.zeros(q.shape, dtype=ad, device=q.device)
        kv = torch.stack([k, v])
        incoming = None
        for step in range(ring.size):
            pending = ring.shift(kv) if step < ring.size - 1 else None
            j = ring.chunk_at(step)
            n = valid[j]
            contrib = torch.zeros((2,) + tuple(k.shape), dtype=ad, device=k.device)
            if n > 0:
                dq_j, dk_j, dv_j = chunk_attention_backward(do, q, kv[0, :, :n], kv[1, :, :n], out, lse, delta,
                                                            scale, ctx.aux.get(j))
                dq += dq_j
                contrib[0, :, :n] += dk_j
                contrib[1, :, :n] += dv_j
            if incoming is not None:
                contrib += incoming.wait()  # chunk j's accumulator from the ranks before us
            incoming = ring.shift(contrib, tag=1)  # on to the next rank; after a full turn: home
            if pending is not None:
                kv = pending.wait()
        dkv = incoming.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def _ring_attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, group, valid, scale):
    """No-grad ring: (out, out_tan) merged over the chunks with lse / lse_tan (docs/design.md §4).
    k, v, k_tan, v_tan travel in one message."""
    ring = _Ring(group)
    kv_with_tan = torch.stack([k, v, k_tan.to(k.dtype), v_tan.to(k.dtype)])
    acc = None
    for step in range(ring.size):
        pending = ring.shift(kv_with_tan) if step < ring.size - 1 else None  # overlaps the compute below
        n = valid[ring.chunk_at(step)]
        if n > 0:
            k_j, v_j, k_tan_j, v_tan_j = kv_with_tan.unbind(0)
            part = attention_with_tangent(q, k_j, v_j, q_tan, k_tan_j, v_tan_j, scale,
                                          kv_len=None if n == k.shape[1] else n)
            acc = merge_attention_pair(acc, part, out=acc)
        if pending is not None:
            kv_with_tan = pending.wait()
    out, out_tan, _, _ = finalize_attention_merge(acc, q.dtype)
    return out, out_tan


def ring_attention(q, k, v, q_tan, k_tan, v_tan, group, valid, scale):
    """(out, out_tan) of q against the ring's key chunks; out_tan None (and the primal differentiable)
    without tangents, nothing differentiable with them."""
    if q_tan is None:
        return _RingAttention.apply(q, k, v, group, valid, scale), None
    with torch.no_grad():
        return _ring_attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, group, valid, scale)
