"""Context parallelism: the token sequence split over the CP group, for the primal and the tangent.

Layout. The flattened (frames x height x width) patch sequence of S tokens is cut into CP
chunks of s = ceil(S / cp) tokens; CP rank r holds tokens [r*s, (r+1)*s), the last chunks
zero-padded, so CP never has to divide the frame count or S. ``split_to_cp_chunk`` makes the
chunk right after the patch embedding, ``gather_cp_chunks`` all-gathers the head's output
(64 values per token) and strips the padding: the model output is replicated over CP and
the loss is computed on full latents, the same way on every CP rank. Under sequence
parallelism the chunk is sharded further over TP (``chunk_length`` is then the length the
tensor-parallel region sees). Padded tokens are computed with (they are per-token rows) but
never attended to as keys and dropped before any loss.

Self-attention over the whole sequence (``context_parallel_attention``), three ways:

- ``a2a`` (Ulysses): one all-to-all trades the sequence split for a head split (q, k, v and
  their tangents packed into ONE call), attention runs over all S tokens on heads/cp heads,
  a second all-to-all trades back. Needs (heads / TP) divisible by CP.
- ``p2p`` (ring, ``ring_attention.py``): key/value chunks (with their tangents, in one message)
  travel around the CP ring; each rank attends its queries to every chunk
  (``kernels.chunk_attention``) and merges the partial results with the lse / lse_tan rule of
  docs/design.md §4 (``kernels.merge``). The next
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

Gradients. Every CP rank computes the same loss on the replicated output; ``gather_cp_chunks``
hands each rank only its own chunk's output gradient, and ``split_to_cp_chunk`` returns a
gradient that is zero outside the rank's chunk. So every parameter gradient (replicated
embeddings, adaLN tables, norms, linears) is *partial* on a CP rank: its own tokens'
contribution. They are SUMMED over CP, with the data-parallel sum, in the one all-reduce over
megatron's ``data_parallel_group(with_context_parallel=True)`` the trainer already does
(losses are sums over samples divided by the global batch, so DP x CP gradients simply add).
Nothing is averaged over CP and nothing is reduced inside the model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels import attention, attention_with_tangent
from ..kernels.numerics import resolve_softmax_scale
from . import state
from .mappings import all_gather_tokens, pack, unpack
from .ring_attention import ring_attention

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


class _SplitToChunk(torch.autograd.Function):
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


class _GatherChunks(torch.autograd.Function):
    """All-gather the chunks into the replicated sequence. Backward: this rank's chunk of the
    gradient (every rank computed the same loss, so its gradient is the whole gradient)."""

    @staticmethod
    def forward(ctx, x, seq_len: int):
        ctx.seq_len = seq_len
        return all_gather_tokens(x, seq_len, state.context_parallel_group())

    @staticmethod
    def backward(ctx, g):
        return _own_chunk(g, ctx.seq_len), None


def split_to_cp_chunk(x, x_tan=None):
    """Model entry: [B, S, ...] tokens (and tangent) -> this CP rank's chunk [B, ceil(S/cp), ...]."""
    if _cp() == 1:
        return x, x_tan
    return _SplitToChunk.apply(x), None if x_tan is None else _SplitToChunk.apply(x_tan)


def gather_cp_chunks(y, y_tan=None, seq_len: int | None = None):
    """Model exit: chunks [B, s, ...] (and tangent, in the same collective) -> the replicated
    [B, seq_len, ...] sequence, padding stripped."""
    if _cp() == 1:
        return y, y_tan
    seq_len = _cp() * y.shape[1] if seq_len is None else seq_len
    if chunk_length(seq_len) != y.shape[1]:
        raise ValueError(f"context-parallel chunks of {y.shape[1]} tokens on {_cp()} ranks cannot hold "
                         f"{seq_len} tokens (expected {chunk_length(seq_len)})")
    buf, n = pack(y, y_tan)
    return unpack(_GatherChunks.apply(buf, seq_len), n)


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


# ------------------------------------------------------------------ the entry point


def _local_attention(q, k, v, q_tan, k_tan, v_tan, kv_len, scale):
    """Attention over all keys present (the first kv_len of them)."""
    if q_tan is None:
        if kv_len is not None:
            k, v = k[:, :kv_len], v[:, :kv_len]
        return attention(q, k, v, scale), None
    o, o_tan, _, _ = attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, scale, kv_len=kv_len)
    return o, o_tan


def context_parallel_attention(q, k, v, q_tan=None, k_tan=None, v_tan=None, *, seq_len: int | None = None,
                               softmax_scale: float | None = None):
    """Self-attention of this CP rank's query chunk over the whole sequence.

    q, k, v [B, s, H, D] (s = ``chunk_length(seq_len)``, H the heads of this TP rank, RoPE
    applied) and optional tangents; returns (out, out_tan) [B, s, H, D], out_tan None without tangent.
    With tangents nothing is differentiable (the tangent pass); without, the primal is.
    Without CP this is ``kernels.attention`` / ``attention_with_tangent`` itself.
    """
    cp = _cp()
    if cp == 1:
        return _local_attention(q, k, v, q_tan, k_tan, v_tan, None, softmax_scale)
    seq_len = cp * q.shape[1] if seq_len is None else seq_len
    s = q.shape[1]
    if chunk_length(seq_len) != s:
        raise ValueError(f"context-parallel attention got chunks of {s} tokens for a sequence of {seq_len} "
                         f"on {cp} ranks (expected {chunk_length(seq_len)})")
    scale = resolve_softmax_scale(q, softmax_scale)
    comm = state.context_parallel_comm_type()
    with_tan = q_tan is not None
    if with_tan:
        k_tan = torch.zeros_like(k) if k_tan is None else k_tan
        v_tan = torch.zeros_like(v) if v_tan is None else v_tan

    if comm == "p2p":
        valid = [_valid(seq_len, j * s, s) for j in range(cp)]
        return ring_attention(q, k, v, q_tan, k_tan, v_tan, state.context_parallel_group(), valid, scale)

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
    if with_tan:
        q, k, v, q_tan, k_tan, v_tan = _to_heads([q, k, v, q_tan, k_tan, v_tan], inner)
    else:
        q, k, v = _to_heads([q, k, v], inner)
    if outer is None or dist.get_world_size(outer) == 1:
        n = _valid(seq_len, 0, length)
        o, o_tan = _local_attention(q, k, v, q_tan, k_tan, v_tan, None if n == length else n, scale)
    else:
        valid = [_valid(seq_len, j * length, length) for j in range(dist.get_world_size(outer))]
        o, o_tan = ring_attention(q, k, v, q_tan, k_tan, v_tan, outer, valid, scale)
    if o_tan is None:
        return _to_sequence([o], inner)[0], None
    o, o_tan = _to_sequence([o, o_tan], inner)
    return o, o_tan
