"""Context parallelism: the token sequence split over the CP group, for the primal and the tangent.

Layout. The flattened (frames x height x width) patch sequence of S tokens is cut into CP
chunks of s = ceil(S / cp) tokens; CP rank r holds tokens [r*s, (r+1)*s), the last chunks
zero-padded, so CP never has to divide the frame count or S. ``split_sequence`` makes the
chunk right after the patch embedding, ``gather_sequence`` all-gathers the head's output
(64 values per token) and strips the padding: the model output is replicated over CP and
the loss is computed on full latents, the same way on every CP rank. Under sequence
parallelism the chunk is sharded further over TP (``chunk_length`` is then the length the
tensor-parallel region sees). Padded tokens are computed with (they are per-token rows) but
never attended to as keys and dropped before any loss.

Self-attention over the whole sequence (``context_parallel_attention``), three ways:

- ``a2a`` (Ulysses): one all-to-all trades the sequence split for a head split (q, k, v and
  their tangents packed into ONE call), attention runs over all S tokens on heads/cp heads,
  a second all-to-all trades back. Needs (heads / TP) divisible by CP.
- ``p2p`` (ring): key/value chunks (with their tangents, in one message) travel around the
  CP ring; each rank attends its queries to every chunk and merges the partial results with
  the lse / tlse rule of DESIGN.md section 4 (``kernels.merge_attention_pair``). The next
  chunk's isend/irecv is posted before the current chunk is computed, so on GPU the NCCL
  transfer overlaps the attention. Any CP size.
- ``a2a+p2p``: all-to-all inside groups of A ranks, ring across the B groups
  (``--hierarchical-context-parallel-sizes A B``).

Padding keys are excluded by length: the padded tail of a key chunk is cut off (with-grad
path) or masked with the kernel's ``kv_len`` (tangent path); a chunk with no real key is
skipped. The tangent pass is forward-only (no graph). The with-grad primal ring is an
autograd Function whose backward re-visits the chunks with the merged (global) lse and
output (FlashAttention's backward per chunk on CUDA in half precision, plain math in fp32 /
fp64 otherwise), sending each chunk's dK, dV accumulator around the ring back to its owner.
Cross-attention needs no CP communication: queries stay in their chunk, text is replicated.

Gradients. Every CP rank computes the same loss on the replicated output; ``gather_sequence``
hands each rank only its own chunk's output gradient, and ``split_sequence`` returns a
gradient that is zero outside the rank's chunk. So every parameter gradient (replicated
embeddings, adaLN tables, norms, linears) is *partial* on a CP rank: its own tokens'
contribution. They are SUMMED over CP, with the data-parallel sum, in the one all-reduce over
megatron's ``data_parallel_group(with_context_parallel=True)`` the trainer already does
(losses are sums over samples divided by the global batch, so DP x CP gradients simply add).
Nothing is averaged over CP and nothing is reduced inside the model.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import state
from .mappings import pack, unpack

# ------------------------------------------------------------------ layout


def _cp() -> int:
    return state.context_parallel_world_size()


def chunk_length(seq_len: int | None) -> int | None:
    """Tokens each CP rank holds (padded): ceil(seq_len / cp); seq_len itself without CP."""
    if seq_len is None or _cp() == 1:
        return seq_len
    return -(-seq_len // _cp())


def token_range(seq_len: int) -> tuple[int, int]:
    """[start, stop) of this CP rank's chunk in the flattened sequence (stop may pass seq_len:
    padding). Pass it to ``rope_cos_sin(..., token_range=...)``."""
    s = chunk_length(seq_len)
    r = state.context_parallel_rank()
    return r * s, (r + 1) * s


def _valid(seq_len: int, start: int, length: int) -> int:
    """Real tokens in [start, start + length) of a sequence of seq_len tokens."""
    return max(0, min(length, seq_len - start))


def validate_cp(config, tp: int, cp: int, comm_type: str, hierarchical_sizes=None) -> None:
    """Raise a clear ValueError if attention cannot run with this context-parallel layout."""
    if cp == 1:
        return
    heads = config.num_attention_heads
    local = heads // tp
    if comm_type == "a2a" and local % cp:
        raise ValueError(
            f"--cp-comm-type a2a needs the attention heads per tensor-parallel rank ({heads} heads / TP {tp} "
            f"= {local}) divisible by --context-parallel-size {cp}; use --cp-comm-type p2p (ring attention, "
            "any CP size) or a2a+p2p with an all-to-all size that divides it")
    if comm_type == "a2a+p2p":
        if not hierarchical_sizes:
            raise ValueError("--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A B")
        a = hierarchical_sizes[0]
        if local % a:
            raise ValueError(
                f"--cp-comm-type a2a+p2p: the all-to-all size A = {a} of --hierarchical-context-parallel-sizes "
                f"must divide the attention heads per tensor-parallel rank ({heads} / TP {tp} = {local}); "
                "use --cp-comm-type p2p (ring attention, any CP size)")


def validate_current_layout(config) -> None:
    """``validate_cp`` for the initialized process groups (WanDiT's constructor calls it)."""
    cp = _cp()
    if cp == 1:
        return
    groups = state.hierarchical_context_parallel_groups()
    sizes = [dist.get_world_size(g) for g in groups] if groups else None
    validate_cp(config, state.tensor_parallel_world_size(), cp, state.context_parallel_comm_type(), sizes)


# ------------------------------------------------------------------ model entry / exit


def _own_chunk(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[N, seq_len, ...] -> this rank's zero-padded [N, s, ...] chunk (a copy)."""
    lo, hi = token_range(seq_len)
    n = _valid(seq_len, lo, hi - lo)
    out = x.new_zeros((x.shape[0], hi - lo) + tuple(x.shape[2:]))
    out[:, :n] = x[:, lo:lo + n]
    return out


class _SplitSequence(torch.autograd.Function):
    """Keep this rank's chunk. Backward: the chunk's gradient in place, zeros elsewhere (the
    rest is other ranks' part; the DP x CP gradient all-reduce adds them)."""

    @staticmethod
    def forward(ctx, x):
        ctx.seq_len = x.shape[1]
        return _own_chunk(x, x.shape[1])

    @staticmethod
    def backward(ctx, g):
        lo, hi = token_range(ctx.seq_len)
        n = _valid(ctx.seq_len, lo, hi - lo)
        out = g.new_zeros((g.shape[0], ctx.seq_len) + tuple(g.shape[2:]))
        out[:, lo:lo + n] = g[:, :n]
        return out


def _gather_chunks(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[N, s, ...] chunks of every CP rank -> [N, seq_len, ...] (padding stripped)."""
    cp, (n, s), rest = _cp(), x.shape[:2], tuple(x.shape[2:])
    recv = x.new_empty((cp * n, s) + rest)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(recv, x.contiguous(), group=state.context_parallel_group())
    full = recv.view((cp, n, s) + rest).movedim(0, 1).reshape((n, cp * s) + rest)
    return full[:, :seq_len].contiguous()


class _GatherSequence(torch.autograd.Function):
    """All-gather the chunks into the replicated sequence. Backward: this rank's chunk of the
    gradient (every rank computed the same loss, so its gradient is the whole gradient)."""

    @staticmethod
    def forward(ctx, x, seq_len: int):
        ctx.seq_len = seq_len
        return _gather_chunks(x, seq_len)

    @staticmethod
    def backward(ctx, g):
        return _own_chunk(g, ctx.seq_len), None


def split_sequence(x, tx=None):
    """Model entry: [B, S, ...] tokens (and tangent) -> this CP rank's chunk [B, ceil(S/cp), ...]."""
    if _cp() == 1:
        return x, tx
    return _SplitSequence.apply(x), None if tx is None else _SplitSequence.apply(tx)


def gather_sequence(y, ty=None, seq_len: int | None = None):
    """Model exit: chunks [B, s, ...] (and tangent, in the same collective) -> the replicated
    [B, seq_len, ...] sequence, padding stripped."""
    if _cp() == 1:
        return y, ty
    seq_len = _cp() * y.shape[1] if seq_len is None else seq_len
    if chunk_length(seq_len) != y.shape[1]:
        raise ValueError(f"context-parallel chunks of {y.shape[1]} tokens on {_cp()} ranks cannot hold "
                         f"{seq_len} tokens (expected {chunk_length(seq_len)})")
    buf, n = pack(y, ty)
    return unpack(_GatherSequence.apply(buf, seq_len), n)


# ------------------------------------------------------------------ all-to-all (Ulysses)


def _seq_to_heads(buf: torch.Tensor, group) -> torch.Tensor:
    """[n, B, s, H, D] sequence chunks -> [n, B, P*s, H/P, D] head groups (P = group size)."""
    p = dist.get_world_size(group)
    n, b, s, h, d = buf.shape
    send = buf.reshape(n, b, s, p, h // p, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    recv = torch.empty_like(send)  # [P (source rank = sequence chunk), n, B, s, H/P, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(n, b, p * s, h // p, d)


def _heads_to_seq(buf: torch.Tensor, group) -> torch.Tensor:
    """Inverse of ``_seq_to_heads``: [n, B, P*s, h, D] -> [n, B, s, P*h, D]."""
    p = dist.get_world_size(group)
    n, b, ps, h, d = buf.shape
    s = ps // p
    send = buf.reshape(n, b, p, s, h, d).permute(2, 0, 1, 3, 4, 5).contiguous()
    recv = torch.empty_like(send)  # [P (source rank = head group), n, B, s, h, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(n, b, s, p * h, d)


class _AllToAll(torch.autograd.Function):
    """Sequence chunks -> head groups (``to_heads``) or back; backward: the other direction."""

    @staticmethod
    def forward(ctx, buf, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(buf, group)

    @staticmethod
    def backward(ctx, g):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(g.contiguous(), ctx.group), None, None


def _to_heads(tensors, group):
    return _AllToAll.apply(torch.stack(tensors), group, True).unbind(0)


def _to_sequence(tensors, group):
    return _AllToAll.apply(torch.stack(tensors), group, False).unbind(0)


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


# ------------------------------------------------------------------ attention of one key chunk


def _scale(q, softmax_scale):
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _use_flash(q) -> bool:
    from ..kernels.dispatch import _backend_for

    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and _backend_for(q) != "reference")


_Q_BLOCK_ELEMENTS = 1 << 26  # plain-math path: score rows per block x keys x heads


def _q_blocks(q, nk):
    rows = max(1, _Q_BLOCK_ELEMENTS // max(1, nk * q.shape[2]))
    return range(0, q.shape[1], rows), rows


_flash_failed: list[str] = []


def _chunk_forward(q, k, v, scale):
    """Attention of q to one key chunk: (out [B,Sq,H,D], lse [B,H,Sq], what the backward needs:
    FlashAttention's auxiliary outputs, or None for the plain-math path)."""
    if _use_flash(q) and not _flash_failed:
        try:
            r = torch.ops.aten._scaled_dot_product_flash_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale)
            return r[0].transpose(1, 2), r[1][..., :q.shape[1]], tuple(r[2:8])
        except RuntimeError as e:  # an unsupported build or shape: plain math from now on, said once
            import warnings

            _flash_failed.append(str(e))
            warnings.warn(f"ring attention: FlashAttention per chunk failed ({e}); using plain math in query blocks",
                          stacklevel=2)
    ad = _acc(q)
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


def _chunk_backward(do, q, k, v, out, lse, delta, scale, aux):
    """dq, dk, dv of one key chunk, with the *merged* out and lse of all chunks (so P is the
    global softmax restricted to this chunk). delta = rowsum(dO * O) [B, H, Sq]."""
    if aux is not None:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
            lse, *aux[:4], 0.0, False, *aux[4:6], scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    ad = _acc(q)
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


def _merge_primal(acc, o, lse):
    """Fold one chunk's (out, lse) into the running (out, lse) of the chunks seen so far
    (fp32, fp64 for fp64 inputs)."""
    o = o.to(_acc(o))
    lse = lse.to(o.dtype)
    if acc is None:
        return o.clone(), lse.clone()
    o_a, lse_a = acc
    new = torch.logaddexp(lse_a, lse)
    w_a = torch.exp(lse_a - new).transpose(1, 2).unsqueeze(-1)
    w_b = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)
    return o_a * w_a + o * w_b, new


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
                o_j, lse_j, aux[j] = _chunk_forward(q, kv[0, :, :n], kv[1, :, :n], scale)
                acc = _merge_primal(acc, o_j, lse_j)
            if pending is not None:
                kv = pending.wait()
        out, lse = acc[0].to(q.dtype), acc[1].to(_acc(q)).contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.valid, ctx.scale, ctx.aux = group, valid, scale, aux
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        ring, valid, scale = _Ring(ctx.group), ctx.valid, ctx.scale
        do = do.contiguous()
        ad = _acc(q)
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
                dq_j, dk_j, dv_j = _chunk_backward(do, q, kv[0, :, :n], kv[1, :, :n], out, lse, delta, scale,
                                                   ctx.aux.get(j))
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


def _ring_attention_with_tangent(q, k, v, tq, tk, tv, group, valid, scale):
    """No-grad ring: (out, tout) merged over the chunks with lse / tlse (DESIGN.md section 4).
    k, v, tk, tv travel in one message."""
    from ..kernels import attention_with_tangent, finalize_attention_merge, merge_attention_pair

    ring = _Ring(group)
    kvt = torch.stack([k, v, tk.to(k.dtype), tv.to(k.dtype)])
    acc = None
    for step in range(ring.size):
        pending = ring.shift(kvt) if step < ring.size - 1 else None  # overlaps the compute below
        n = valid[ring.chunk_at(step)]
        if n > 0:
            k_j, v_j, tk_j, tv_j = kvt.unbind(0)
            part = attention_with_tangent(q, k_j, v_j, tq, tk_j, tv_j, scale, kv_len=None if n == k.shape[1] else n)
            acc = merge_attention_pair(acc, part, out=acc)
        if pending is not None:
            kvt = pending.wait()
    out, tout, _, _ = finalize_attention_merge(acc, q.dtype)
    return out, tout


def _ring(q, k, v, tq, tk, tv, group, valid, scale):
    if tq is None:
        return _RingAttention.apply(q, k, v, group, valid, scale), None
    with torch.no_grad():
        return _ring_attention_with_tangent(q, k, v, tq, tk, tv, group, valid, scale)


# ------------------------------------------------------------------ the entry point


def _local_attention(q, k, v, tq, tk, tv, kv_len, scale):
    """Attention over all keys present (the first kv_len of them)."""
    from ..kernels import attention, attention_with_tangent

    if tq is None:
        if kv_len is not None:
            k, v = k[:, :kv_len], v[:, :kv_len]
        return attention(q, k, v, scale), None
    o, to, _, _ = attention_with_tangent(q, k, v, tq, tk, tv, scale, kv_len=kv_len)
    return o, to


def context_parallel_attention(q, k, v, tq=None, tk=None, tv=None, *, seq_len: int | None = None,
                               softmax_scale: float | None = None):
    """Self-attention of this CP rank's query chunk over the whole sequence.

    q, k, v [B, s, H, D] (s = ``chunk_length(seq_len)``, H the heads of this TP rank, RoPE
    applied) and optional tangents; returns (out, tout) [B, s, H, D], tout None without tangent.
    With tangents nothing is differentiable (the tangent pass); without, the primal is.
    Without CP this is ``kernels.attention`` / ``attention_with_tangent`` itself.
    """
    cp = _cp()
    if cp == 1:
        return _local_attention(q, k, v, tq, tk, tv, None, softmax_scale)
    seq_len = cp * q.shape[1] if seq_len is None else seq_len
    s = q.shape[1]
    if chunk_length(seq_len) != s:
        raise ValueError(f"context-parallel attention got chunks of {s} tokens for a sequence of {seq_len} "
                         f"on {cp} ranks (expected {chunk_length(seq_len)})")
    scale = _scale(q, softmax_scale)
    comm = state.context_parallel_comm_type()
    with_t = tq is not None
    if with_t:
        tk = torch.zeros_like(k) if tk is None else tk
        tv = torch.zeros_like(v) if tv is None else tv

    if comm == "p2p":
        valid = [_valid(seq_len, j * s, s) for j in range(cp)]
        return _ring(q, k, v, tq, tk, tv, state.context_parallel_group(), valid, scale)

    if comm == "a2a":
        inner, outer = state.context_parallel_group(), None
    else:
        groups = state.hierarchical_context_parallel_groups()
        if groups is None:
            raise RuntimeError("--cp-comm-type a2a+p2p: megatron-core made no hierarchical context-parallel groups "
                               "(pass --hierarchical-context-parallel-sizes A B)")
        inner, outer = groups
    a = dist.get_world_size(inner)
    if q.shape[2] % a:
        raise ValueError(f"--cp-comm-type {comm}: {q.shape[2]} attention heads on this tensor-parallel rank are "
                         f"not divisible by the all-to-all size {a}; use --cp-comm-type p2p")
    # After the all-to-all this rank holds a tokens chunks a*s long: [base, base + a*s) of the sequence.
    length = a * s
    if with_t:
        q, k, v, tq, tk, tv = _to_heads([q, k, v, tq, tk, tv], inner)
    else:
        q, k, v = _to_heads([q, k, v], inner)
    if outer is None or dist.get_world_size(outer) == 1:
        n = _valid(seq_len, 0, length)
        o, to = _local_attention(q, k, v, tq, tk, tv, None if n == length else n, scale)
    else:
        valid = [_valid(seq_len, j * length, length) for j in range(dist.get_world_size(outer))]
        o, to = _ring(q, k, v, tq, tk, tv, outer, valid, scale)
    if to is None:
        return _to_sequence([o], inner)[0], None
    o, to = _to_sequence([o, to], inner)
    return o, to
