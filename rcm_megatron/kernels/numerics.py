"""Precision and scale conventions shared by every attention path (plain math, chunk merge, ring).

Statistics (lse, lse_tan) and accumulators are fp32 for half-precision inputs and fp64 for fp64
inputs, so the float64 oracle stays float64 end to end.
"""

from __future__ import annotations

import math

import torch


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 inputs (the oracle), fp32 otherwise (bf16 / fp16 / fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def resolve_softmax_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    """The given scale, or 1 / sqrt(head_dim) of q [..., head_dim]."""
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
