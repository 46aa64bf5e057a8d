"""Tensor-parallel linears that carry a tangent, and the edges of tensor-parallel regions.

Megatron-style column/row split. Primal and tangent go through one GEMM (stacked along the
batch dimension) and one collective (packed, see ``mappings``).

A tensor-parallel region is entered once per input, however many column-parallel linears
read it (q, k and v share one all-gather):

- ``tensor_parallel_input(x, x_tan, seq_len)``: the token stream. Without sequence parallelism
  it is replicated: identity forward, gradient all-reduced. With sequence parallelism it is
  sharded along the sequence: all-gather forward (padding stripped), reduce-scatter backward.
- ``replicated_input(context)``: a replicated tensor that is never sequence-sharded (text).
- ``RowParallelLinear`` leaves the region itself: all-reduce, or reduce-scatter to sequence
  shards under sequence parallelism.

The model enters and leaves sequence parallelism with ``shard_sequence`` (after the patch
embedding) and ``unshard_sequence`` (after the head's projection, where tokens are 64 wide
rather than hidden-size wide). Replicated parameters applied to sequence shards go through
``grad_sum_over_sequence_shards``, which sums their partial gradients over TP in backward,
so the model's gradients come out complete and no extra call is needed after backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import state
from .mappings import (all_gather_sequence, all_reduce_tensor_parallel, all_reduce_tp_sum,  # noqa: F401
                       copy_to_tensor_parallel, grad_sum_over_sequence_shards, pack, reduce_scatter_sequence,
                       split_to_sp_shard, unpack)


def validate_tp(config, tp: int, world_size: int | None = None) -> None:
    """Raise a clear ValueError if a WanConfig cannot be split over ``tp`` tensor-parallel ranks.

    Call before building any model (WanDiT calls it first thing in its constructor too).
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tensor-model-parallel-size must be a positive integer, got {tp!r}")
    problems = []
    if config.num_attention_heads % tp:
        problems.append(f"num_attention_heads={config.num_attention_heads}")
    if config.hidden_size % tp:
        problems.append(f"hidden_size={config.hidden_size}")
    if config.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={config.ffn_hidden_size}")
    if world_size is not None and world_size % tp:
        problems.append(f"world size {world_size}")
    if problems:
        raise ValueError(f"--tensor-model-parallel-size {tp} must divide {', '.join(problems)}")


def mark_tensor_parallel(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Record that ``param`` is split over TP along ``dim`` (our ``tp_split_dim`` plus the
    attributes megatron-core's optimizer and checkpointing read)."""
    param.tp_split_dim = dim
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


def linear_with_tangent(x, x_tan, weight, bias):
    """y = x W^T + b and y_tan = x_tan W^T, in one GEMM when a tangent is present.

    The outputs are the two halves of one buffer, so a following collective packs them for free.
    The bias is added in the GEMM output's dtype, as ``F.linear(x, weight, bias)`` does under
    autocast: adding an fp32 master bias to a bf16 output would promote the primal to fp32 in the
    tangent pass only, and every later op (attention included) would follow it into fp32.
    """
    if x_tan is None:
        return F.linear(x, weight, bias), None
    buf, n = pack(x, x_tan)  # no copy when x and x_tan are already stacked
    y, y_tan = unpack(F.linear(buf, weight), n)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y, y_tan


# ------------------------------------------------------------------ region edges


def tensor_parallel_input(x, x_tan=None, seq_len: int | None = None):
    """Enter a tensor-parallel region with the token stream (see the module docstring).

    ``seq_len`` is the number of real tokens (sequence parallelism strips the padding with it).
    The returned (x, x_tan) are stacked in one buffer, so each linear reading them runs one GEMM.
    """
    if state.sequence_parallel_enabled():
        return all_gather_sequence(x, x_tan, seq_len=seq_len, grad="reduce_scatter")
    buf, n = pack(x, x_tan)
    return unpack(copy_to_tensor_parallel(buf), n)


def replicated_input(x):
    """Enter a tensor-parallel region with a replicated, never sequence-sharded tensor."""
    return copy_to_tensor_parallel(x)


def tensor_parallel_output(y, y_tan=None):
    """Leave a tensor-parallel region with partial sums: all-reduce, or reduce-scatter to
    sequence shards (zero-padded) under sequence parallelism. One collective for y and y_tan."""
    if state.sequence_parallel_enabled():
        return reduce_scatter_sequence(y, y_tan)
    return all_reduce_tensor_parallel(y, y_tan)


def shard_sequence(x, x_tan=None):
    """Model entry to sequence parallelism: keep this rank's token shard (identity without SP)."""
    if not state.sequence_parallel_enabled():
        return x, x_tan
    return split_to_sp_shard(x, x_tan)


def unshard_sequence(y, y_tan=None, seq_len: int | None = None):
    """Model exit from sequence parallelism: all-gather the token shards into the replicated
    [B, seq_len, ...] output (identity without SP). The loss must then be computed the same
    way on every TP rank, as at TP = 1; the backward keeps each rank's part of the gradient."""
    if not state.sequence_parallel_enabled():
        return y, y_tan
    return all_gather_sequence(y, y_tan, seq_len=seq_len, grad="split")


# ------------------------------------------------------------------ layers


class _FP8Frozen:
    """A linear that can be frozen into FP8 weights (the teacher, ``--fp8-teacher``)."""

    def quantize_fp8(self) -> None:
        """Quantize the weight per output row into FP8 (``kernels/fp8.py``) and drop the original:
        afterwards the layer runs primal passes only, through ``torch._scaled_mm``."""
        from ..kernels.fp8 import quantize_rows

        q, scale = quantize_rows(self.weight.detach())
        del self.weight
        self.register_parameter("weight", None)
        self.weight_fp8, self.weight_scale = q, scale

    def _fp8_linear(self, x, x_tan, bias):
        from ..kernels.fp8 import fp8_linear

        if x_tan is not None:
            raise RuntimeError("an FP8-frozen linear (the --fp8-teacher teacher) has no tangent pass")
        return fp8_linear(x, self.weight_fp8, self.weight_scale, bias), None


class ColumnParallelLinear(_FP8Frozen, nn.Module):
    """Output features split across the tensor-parallel group.

    The input must already be inside the region (``tensor_parallel_input`` /
    ``replicated_input``): the caller enters once for all linears that share an input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        tp = state.tensor_parallel_world_size()
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by tensor-model-parallel-size {tp}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(out_features // tp, in_features)), 0)
        if bias:
            self.bias = mark_tensor_parallel(nn.Parameter(torch.zeros(out_features // tp)), 0)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("weight_fp8", None, persistent=False)  # never saved: checkpoints keep full precision
        self.register_buffer("weight_scale", None, persistent=False)

    def forward(self, x, x_tan=None):
        if self.weight_fp8 is not None:
            return self._fp8_linear(x, x_tan, self.bias)
        return linear_with_tangent(x, x_tan, self.weight, self.bias)


class RowParallelLinear(_FP8Frozen, nn.Module):
    """Input features split across the tensor-parallel group; output summed over it (and
    reduce-scattered to sequence shards under sequence parallelism). The bias is replicated."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        tp = state.tensor_parallel_world_size()
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by tensor-model-parallel-size {tp}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(out_features, in_features // tp)), 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            self.bias.tp_split_dim = None
        else:
            self.register_parameter("bias", None)
        self.register_buffer("weight_fp8", None, persistent=False)  # never saved: checkpoints keep full precision
        self.register_buffer("weight_scale", None, persistent=False)

    def forward(self, x, x_tan=None):
        if self.weight_fp8 is not None:
            y, y_tan = tensor_parallel_output(*self._fp8_linear(x, x_tan, None))
        else:
            y, y_tan = tensor_parallel_output(*linear_with_tangent(x, x_tan, self.weight, None))
        if self.bias is not None:
            y = y + grad_sum_over_sequence_shards(self.bias)
        return y, y_tan
