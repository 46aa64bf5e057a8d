"""Tensor-parallel linears that carry a tangent.

Megatron-style column/row split. The primal and its tangent go through one GEMM (stacked
along the batch dimension) and one collective. megatron-core's own linears cannot be used
because they know nothing of tangents; its autograd mappings are used for the with-grad
passes (they run on gloo as well as NCCL).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import state


def linear_with_tangent(x, tx, weight, bias):
    """y = x W^T + b and ty = tx W^T, in one GEMM when a tangent is present."""
    if tx is None:
        return F.linear(x, weight, bias), None
    n = x.shape[0]
    y = F.linear(torch.cat([x, tx.to(x.dtype)], dim=0), weight)
    y, ty = y[:n], y[n:]
    if bias is not None:
        y = y + bias
    return y, ty


def _copy_to_tp(x):
    """Identity forward, all-reduce of the gradient backward (input of a column-parallel layer)."""
    if state.tensor_parallel_world_size() == 1:
        return x
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x)


def _reduce_from_tp(x):
    """All-reduce forward, identity backward (output of a row-parallel layer)."""
    if state.tensor_parallel_world_size() == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x)


class ColumnParallelLinear(nn.Module):
    """Output features split across the tensor-parallel group; input replicated."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        tp = state.tensor_parallel_world_size()
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by tensor-model-parallel-size {tp}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features))
        self.weight.tp_split_dim = 0
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features // tp))
            self.bias.tp_split_dim = 0
        else:
            self.register_parameter("bias", None)

    def forward(self, x, tx=None):
        x = _copy_to_tp(x)
        return linear_with_tangent(x, tx, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split across the tensor-parallel group; output summed over it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        tp = state.tensor_parallel_world_size()
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by tensor-model-parallel-size {tp}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp))
        self.weight.tp_split_dim = 1
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            self.bias.tp_split_dim = None
        else:
            self.register_parameter("bias", None)

    def forward(self, x, tx=None):
        y, ty = linear_with_tangent(x, tx, self.weight, None)
        if ty is None:
            y = _reduce_from_tp(y)
        elif state.tensor_parallel_world_size() > 1:
            n = y.shape[0]
            packed = _reduce_from_tp(torch.cat([y, ty], dim=0))
            y, ty = packed[:n], packed[n:]
        if self.bias is not None:
            y = y + self.bias
        return y, ty


def all_reduce_tp_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group, summed again in backward.

    Used for statistics every rank consumes (the whole-hidden RMSNorm of q and k): each
    rank's gradient of the statistic covers only its own outputs, so the backward must sum.
    """
    if state.tensor_parallel_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x, group=state.tensor_parallel_group())
