"""Wan self- and cross-attention, carrying a tangent.

q/k/v projections are column-parallel (heads split over tensor parallelism), the output
projection row-parallel. The token stream enters the tensor-parallel region once per
attention (under sequence parallelism: one all-gather of the token shards, stripped of
padding, so attention sees exactly the real tokens). q and k are RMS-normalized over the
whole hidden size. The
attention itself goes through ``rcm_megatron.kernels``: the differentiable primal for
with-grad passes, the fused attention-with-tangent for tangent passes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import attention, attention_with_tangent
from ..parallel import state
from ..parallel.context_parallel import chunk_length, context_parallel_attention
from ..parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, mark_tensor_parallel,
                                        replicated_input, tensor_parallel_input)
from .layers import rms_norm_rope


class QKNorm(nn.Module):
    """RMSNorm over the full hidden size with a (TP-sliced) affine weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        tp = state.tensor_parallel_world_size()
        self.full_size, self.eps = hidden_size, eps
        self.weight = mark_tensor_parallel(nn.Parameter(torch.ones(hidden_size // tp)), 0)

    def forward(self, x, x_tan=None, rope=None):
        """Normalized x [B, S, D] (and tangent); with ``rope`` = (cos, sin), every head rotated too."""
        return rms_norm_rope(x, x_tan, self.weight, self.eps, self.full_size, rope)


class _Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        tp = state.tensor_parallel_world_size()
        if num_heads % tp:
            raise ValueError(f"attention heads ({num_heads}) not divisible by tensor-model-parallel-size {tp}")
        self.local_heads = num_heads // tp
        self.head_dim = hidden_size // num_heads
        self.to_q = ColumnParallelLinear(hidden_size, hidden_size)
        self.to_k = ColumnParallelLinear(hidden_size, hidden_size)
        self.to_v = ColumnParallelLinear(hidden_size, hidden_size)
        self.to_out = RowParallelLinear(hidden_size, hidden_size)
        self.norm_q = QKNorm(hidden_size, eps)
        self.norm_k = QKNorm(hidden_size, eps)

    def _heads(self, x):
        return None if x is None else x.unflatten(-1, (self.local_heads, self.head_dim))

    def _attend(self, q, k, v, q_tan, k_tan, v_tan):
        if q_tan is None:
            o, o_tan = attention(q, k, v), None
        else:
            o, o_tan, _, _ = attention_with_tangent(q, k, v, q_tan, k_tan, v_tan)
        return o.flatten(-2), None if o_tan is None else o_tan.flatten(-2)


def _flat(o, o_tan):
    return o.flatten(-2), None if o_tan is None else o_tan.flatten(-2)


class SelfAttention(_Attention):
    def forward(self, x, x_tan, rope, seq_len: int | None = None):
        """x [B, S, D] (this rank's context-parallel chunk / sequence-parallel shard of the tokens;
        seq_len = S real tokens of the whole sequence); rope: cos, sin of x's positions."""
        x, x_tan = tensor_parallel_input(x, x_tan, chunk_length(seq_len))
        q, q_tan = self.norm_q(*self.to_q(x, x_tan), rope=rope)
        k, k_tan = self.norm_k(*self.to_k(x, x_tan), rope=rope)
        v, v_tan = self.to_v(x, x_tan)
        q, k, v, q_tan, k_tan, v_tan = map(self._heads, (q, k, v, q_tan, k_tan, v_tan))
        o, o_tan = _flat(*context_parallel_attention(q, k, v, q_tan, k_tan, v_tan, seq_len=seq_len))
        return self.to_out(o, o_tan)


class CrossAttention(_Attention):
    """Queries from the video tokens, keys/values from the text (which has no tangent).

    With ``image_kv`` (Wan2.1 I2V) the same queries also attend, in a separate softmax, to the
    embedded image tokens through their own K/V projections (``add_k_proj``, ``add_v_proj``,
    ``norm_added_k``, diffusers' names); the two results are summed before the output
    projection. Image tokens carry no tangent either (the zero-K/V tangent path of the kernel).
    """

    def __init__(self, hidden_size: int, num_heads: int, eps: float, image_kv: bool = False):
        super().__init__(hidden_size, num_heads, eps)
        if image_kv:
            self.add_k_proj = ColumnParallelLinear(hidden_size, hidden_size)
            self.add_v_proj = ColumnParallelLinear(hidden_size, hidden_size)
            self.norm_added_k = QKNorm(hidden_size, eps)

    def forward(self, x, x_tan, context, seq_len: int | None = None, image_context=None):
        x, x_tan = tensor_parallel_input(x, x_tan, chunk_length(seq_len))
        q, q_tan = self.norm_q(*self.to_q(x, x_tan))
        q, q_tan = self._heads(q), self._heads(q_tan)
        o, o_tan = self._attend_condition(q, q_tan, replicated_input(context), self.to_k, self.to_v, self.norm_k)
        if image_context is not None:
            oi, oi_tan = self._attend_condition(q, q_tan, replicated_input(image_context), self.add_k_proj,
                                                self.add_v_proj, self.norm_added_k)
            o = o + oi
            o_tan = None if o_tan is None else o_tan + oi_tan
        return self.to_out(o, o_tan)

    def _attend_condition(self, q, q_tan, cond, to_k, to_v, norm_k):
        k, _ = norm_k(*to_k(cond))
        v, _ = to_v(cond)
        return self._attend(q, self._heads(k), self._heads(v), q_tan, None, None)
