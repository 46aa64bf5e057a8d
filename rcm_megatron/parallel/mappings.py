"""Tensor- and sequence-parallel collectives, each with its autograd rule and tangent rule.

A collective is linear, so a tangent takes the same collective as its primal. The two
travel in ONE call: they are packed along the batch dimension into one buffer (zero-copy
when they already sit back to back in memory, as the two halves of a stacked GEMM output
do) and unpacked after.

Token tensors are [B, S, ...] with the sequence in dim 1. Under sequence parallelism rank
r of the tensor-parallel group holds tokens [r*s, (r+1)*s) with s = ceil(S / tp); the last
shards are zero-padded when tp does not divide S. The gathers strip that padding again, so
code inside a tensor-parallel region only ever sees the S real tokens.

Every collective here works on gloo (CPU) and NCCL. megatron-core's all-gather /
reduce-scatter mappings allocate on CUDA, and its copy/reduce mappings all-reduce
``input_.contiguous()`` but return ``input_``, which silently drops the reduction of a
non-contiguous gradient; so these are our own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import state

# ------------------------------------------------------------------ packing


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _back_to_back(x: torch.Tensor, x_tan: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # storage pointers would become guards: compiled code concatenates
        return False
    return (x.shape == x_tan.shape and x.dtype == x_tan.dtype and x.device == x_tan.device
            and x.is_contiguous() and x_tan.is_contiguous() and x.numel() > 0
            and x.untyped_storage().data_ptr() == x_tan.untyped_storage().data_ptr()
            and x_tan.storage_offset() == x.storage_offset() + x.numel())


def pack(x: torch.Tensor, x_tan: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """One buffer [n*B, ...] holding the primal (and its tangent, cast to the primal's dtype).

    Returns (buffer, n) with n = 1 (no tangent) or 2. When x and x_tan are the two halves of
    one contiguous buffer already (and no gradient flows through them), that buffer is
    returned without a copy.
    """
    if x_tan is None:
        return x, 1
    x_tan = x_tan.to(x.dtype)
    grads = torch.is_grad_enabled() and (x.requires_grad or x_tan.requires_grad)
    if not grads and _back_to_back(x, x_tan):
        shape = (2 * x.shape[0],) + tuple(x.shape[1:])
        return x.as_strided(shape, _contiguous_strides(shape), x.storage_offset()), 2
    return torch.cat([x, x_tan], dim=0), 2


def unpack(buf: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of ``pack``: (x, x_tan) as views of the buffer (x_tan None when n = 1)."""
    if n == 1:
        return buf, None
    x, x_tan = buf.chunk(2, dim=0)
    return x, x_tan


# ------------------------------------------------------------------ raw collectives


def _group():
    return state.tensor_parallel_group()


def _tp() -> int:
    return state.tensor_parallel_world_size()


def shard_length(seq_len: int, tp: int | None = None) -> int:
    """Tokens per rank under sequence parallelism: ceil(seq_len / tp)."""
    tp = _tp() if tp is None else tp
    return -(-seq_len // tp)


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=_group() if group is None else group)


def _reduce_scatter_into(out: torch.Tensor, inp: torch.Tensor) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=_group())


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group into a fresh contiguous tensor (the input is left untouched)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=_group())
    return out


def all_gather_tokens(x: torch.Tensor, seq_len: int, group=None) -> torch.Tensor:
    """[N, s, ...] token chunks of every rank of ``group`` (default: the TP group) -> [N, seq_len, ...]
    in rank order (padding stripped), contiguous. Sequence-parallel shards and context-parallel
    chunks are both laid out this way."""
    group = _group() if group is None else group
    p, (n, s), rest = dist.get_world_size(group), x.shape[:2], tuple(x.shape[2:])
    recv = x.new_empty((p * n, s) + rest)  # rank-major concatenation along dim 0
    _all_gather_into(recv, x.contiguous(), group)
    full = recv.view((p, n, s) + rest).movedim(0, 1).reshape((n, p * s) + rest)  # a view when n == 1
    return full[:, :seq_len].contiguous()


def _token_chunk(seq_len: int, s: int, r: int) -> tuple[int, int]:
    lo = min(r * s, seq_len)
    return lo, min(lo + s, seq_len)


def _scatter_tokens_sum(x: torch.Tensor) -> torch.Tensor:
    """[N, S, ...] partial sums -> this rank's [N, ceil(S/tp), ...] shard of their TP sum."""
    tp, (n, seq_len), rest = _tp(), x.shape[:2], tuple(x.shape[2:])
    s = shard_length(seq_len, tp)
    if n == 1 and seq_len == tp * s and x.is_contiguous():
        send = x.view((tp, 1, s) + rest)  # rank chunks already laid out one after another
    else:
        send = x.new_zeros((tp, n, s) + rest) if seq_len < tp * s else x.new_empty((tp, n, s) + rest)
        for r in range(tp):
            lo, hi = _token_chunk(seq_len, s, r)
            send[r, :, : hi - lo] = x[:, lo:hi]
    out = x.new_empty((n, s) + rest)
    _reduce_scatter_into(out, send.view((tp * n, s) + rest))
    return out


def _split_tokens(x: torch.Tensor) -> torch.Tensor:
    """[N, S, ...] replicated -> this rank's zero-padded [N, ceil(S/tp), ...] shard (no communication)."""
    tp, seq_len = _tp(), x.shape[1]
    s = shard_length(seq_len, tp)
    lo, hi = _token_chunk(seq_len, s, state.tensor_parallel_rank())
    if hi - lo == s:
        return x[:, lo:hi].contiguous()
    out = x.new_zeros((x.shape[0], s) + tuple(x.shape[2:]))
    out[:, : hi - lo] = x[:, lo:hi]
    return out


def _check_shards(local: int, seq_len: int) -> None:
    if shard_length(seq_len) != local:
        raise ValueError(f"sequence-parallel shards of {local} tokens on {_tp()} ranks cannot hold a "
                         f"sequence of {seq_len} tokens (expected ceil({seq_len}/{_tp()}) = "
                         f"{shard_length(seq_len)} tokens per rank)")


# ------------------------------------------------------------------ autograd rules


class _AllGatherTokens(torch.autograd.Function):
    """All-gather of sequence shards. Backward: reduce-scatter when the gathered tensor feeds
    a tensor-parallel computation (each rank's gradient is partial), split when it is
    replicated (each rank holds the whole gradient already)."""

    @staticmethod
    def forward(ctx, x, seq_len: int, grad_is_partial: bool):
        ctx.grad_is_partial = grad_is_partial
        return all_gather_tokens(x, seq_len)

    @staticmethod
    def backward(ctx, g):
        return (_scatter_tokens_sum(g) if ctx.grad_is_partial else _split_tokens(g)), None, None


class _ToSequenceShards(torch.autograd.Function):
    """Keep this rank's sequence shard: of the TP sum of partial results (reduce-scatter), or
    of a replicated tensor (split, no communication). Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, summed: bool):
        ctx.seq_len = x.shape[1]
        return _scatter_tokens_sum(x) if summed else _split_tokens(x)

    @staticmethod
    def backward(ctx, g):
        return all_gather_tokens(g, ctx.seq_len), None


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the gradient over TP (each rank's part is partial)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g)


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Sum over TP forward; identity backward (the sum is replicated, so is its gradient)."""

    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _AllReduceSum(torch.autograd.Function):
    """Sum over TP forward and backward: a statistic every rank consumes (its gradient on
    each rank covers only that rank's consumers)."""

    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g)


# ------------------------------------------------------------------ public functions


def all_gather_sequence(x, x_tan=None, *, seq_len: int | None = None, grad: str = "reduce_scatter"):
    """Sequence shards [B, s, ...] (and tangent) -> full [B, seq_len, ...], one collective.

    ``seq_len`` (default tp*s) strips the padding. ``grad``: "reduce_scatter" when the
    result feeds tensor-parallel layers, "split" when it is replicated (the model output).
    """
    if grad not in ("reduce_scatter", "split"):
        raise ValueError(f"grad must be 'reduce_scatter' or 'split', got {grad!r}")
    if _tp() == 1:
        return x, x_tan
    seq_len = _tp() * x.shape[1] if seq_len is None else seq_len
    _check_shards(x.shape[1], seq_len)
    buf, n = pack(x, x_tan)
    return unpack(_AllGatherTokens.apply(buf, seq_len, grad == "reduce_scatter"), n)


def reduce_scatter_sequence(x, x_tan=None):
    """Partial sums [B, S, ...] (and tangent) -> this rank's shard [B, ceil(S/tp), ...] of
    the TP sum, one collective; zero-pads S to a multiple of tp. Backward: all-gather."""
    if _tp() == 1:
        return x, x_tan
    buf, n = pack(x, x_tan)
    return unpack(_ToSequenceShards.apply(buf, True), n)


def split_to_sp_shard(x, x_tan=None):
    """Replicated [B, S, ...] (and tangent) -> this rank's zero-padded shard; no communication.
    Backward: all-gather (each rank's gradient covers only its own tokens)."""
    if _tp() == 1:
        return x, x_tan
    return _ToSequenceShards.apply(x, False), None if x_tan is None else _ToSequenceShards.apply(x_tan, False)


def copy_to_tensor_parallel(x):
    """Identity; the gradient is summed over the TP group (input of column-parallel layers)."""
    if _tp() == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _CopyToTensorParallel.apply(x)


def all_reduce_tensor_parallel(x, x_tan=None):
    """Sum over the TP group (and of the tangent, same collective); identity backward
    (output of row-parallel layers without sequence parallelism)."""
    if _tp() == 1:
        return x, x_tan
    buf, n = pack(x, x_tan)
    return unpack(_ReduceFromTensorParallel.apply(buf), n)


def all_reduce_tp_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group, summed again in backward (statistics every rank consumes:
    the whole-hidden RMSNorm of q and k)."""
    if _tp() == 1:
        return x
    return _AllReduceSum.apply(x)


def grad_sum_over_sequence_shards(t: torch.Tensor) -> torch.Tensor:
    """A TP-replicated tensor (parameter, time conditioning) applied to sequence-parallel
    tokens: identity forward; its gradient, partial on each rank (own tokens only), is summed
    over the TP group. Identity without sequence parallelism, where every rank sees all tokens."""
    if not state.sequence_parallel_enabled() or not (torch.is_grad_enabled() and t.requires_grad):
        return t
    return _CopyToTensorParallel.apply(t)
