"""Elementwise and normalization layers with their tangent rules (docs/design.md §3).

Every function takes the primal and an optional tangent and returns ``(y, y_tan)``; a tangent
of None means "no tangent pass" and costs nothing. Normalizations compute in at least fp32
(float64 stays float64, so the oracle tests stay exact) and cast back, as diffusers' Wan does.
In no-grad passes on CUDA the norms (with modulation or RoPE), GELU and the gated residual run as
fused Triton kernels, primal and tangent in one pass (``kernels.fused_ops`` says when).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import pointwise as fused
from ..kernels.fused_ops import use_fused_ops
from ..kernels.norm_modulate import norm_modulate as fused_norm_modulate
from ..kernels.numerics import accumulate_dtype
from ..kernels.qk_norm_rope import qk_norm_rope, row_sums
from ..parallel.tensor_parallel import all_reduce_tp_sum, grad_sum_over_sequence_shards
from .rope import apply_rope


def layer_norm(x, x_tan, eps: float, weight=None, bias=None):
    """LayerNorm over the last dim in fp32. Tangent: rstd (xc_tan - y mean(y xc_tan)) (times weight)."""
    xf = x.to(accumulate_dtype(x))
    mu = xf.mean(-1, keepdim=True)
    xc = xf - mu
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    y = xc * rstd
    y_tan = None
    if x_tan is not None:
        xf_tan = x_tan.to(xf.dtype)
        xc_tan = xf_tan - xf_tan.mean(-1, keepdim=True)
        y_tan = rstd * (xc_tan - y * (y * xc_tan).mean(-1, keepdim=True))
        if weight is not None:
            y_tan = y_tan * weight
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, y_tan


def rms_norm_across_heads(x, x_tan, weight, eps: float, full_size: int):
    """RMSNorm over the whole hidden size (Wan's q/k norm), TP-correct.

    Under tensor parallelism each rank holds a slice of the hidden size; the sums of x^2
    and of x*x_tan are all-reduced in one packed collective.
    """
    xf = x.to(accumulate_dtype(x))
    sums = xf.pow(2).sum(-1, keepdim=True)
    if x_tan is not None:
        xf_tan = x_tan.to(xf.dtype)
        sums = torch.cat([sums, (xf * xf_tan).sum(-1, keepdim=True)], dim=-1)
    sums = all_reduce_tp_sum(sums)
    r = torch.rsqrt(sums[..., :1] / full_size + eps)
    w = weight.to(xf.dtype)
    y = (xf * r * w).to(x.dtype)
    y_tan = None
    if x_tan is not None:
        y_tan = (w * r * (xf_tan - xf * (r * r) * sums[..., 1:] / full_size)).to(x.dtype)
    return y, y_tan


def rms_norm_rope(x, x_tan, weight, eps: float, full_size: int, rope=None):
    """``rms_norm_across_heads`` then, with ``rope`` = (cos, sin) [S, head_dim/2], RoPE of every head;
    x [B, S, D] in and out. Fused: the row sums all-reduced between the two kernels under TP."""
    if use_fused_ops(x, x_tan):
        sums = None if x.shape[-1] == full_size else all_reduce_tp_sum(row_sums(x, x_tan))
        return qk_norm_rope(x, x_tan, weight, eps, rope, full_size, sums)
    y, y_tan = rms_norm_across_heads(x, x_tan, weight, eps, full_size)
    if rope is None:
        return y, y_tan
    head_dim = 2 * rope[0].shape[-1]

    def rotate(h):
        return None if h is None else apply_rope(h.unflatten(-1, (-1, head_dim)), *rope).flatten(-2)
    return rotate(y), rotate(y_tan)


_GELU_K = math.sqrt(2.0 / math.pi)


def gelu_tanh(u, u_tan):
    """GELU with the tanh approximation; tangent f'(u) u_tan."""
    if use_fused_ops(u, u_tan):
        return fused.gelu_tanh(u, u_tan)
    y = F.gelu(u, approximate="tanh")
    if u_tan is None:
        return y, None
    uf = u.to(accumulate_dtype(u))
    z = _GELU_K * (uf + 0.044715 * uf.pow(3))
    th = torch.tanh(z)
    d = 0.5 * (1 + th) + 0.5 * uf * (1 - th * th) * _GELU_K * (1 + 3 * 0.044715 * uf * uf)
    return y, (d * u_tan.to(uf.dtype)).to(u_tan.dtype)


def silu(u, u_tan):
    """SiLU; tangent sigma(u) (1 + u (1 - sigma(u))) u_tan."""
    y = F.silu(u)
    if u_tan is None:
        return y, None
    s = torch.sigmoid(u)
    return y, u_tan * s * (1 + u * (1 - s))


def modulate(n, n_tan, shift, shift_tan, scale, scale_tan):
    """adaLN: n (1 + scale) + shift, with the product rule for the tangent."""
    y = n * (1 + scale) + shift
    if n_tan is None:
        return y, None
    y_tan = n_tan * (1 + scale)
    if scale_tan is not None:
        y_tan = y_tan + n * scale_tan + shift_tan
    return y, y_tan


def gated_residual(x, x_tan, a, a_tan, gate, gate_tan):
    """x + a * gate in fp32, cast back to the residual dtype; product rule for the tangent."""
    if use_fused_ops(x, x_tan, a, a_tan, gate, gate_tan):
        return fused.gated_residual(x, x_tan, a, a_tan, gate, gate_tan)
    y = (x.to(accumulate_dtype(x)) + a.to(accumulate_dtype(a)) * gate).to(x.dtype)
    if x_tan is None:
        return y, None
    y_tan = x_tan.to(accumulate_dtype(x_tan)) + a_tan.to(accumulate_dtype(a_tan)) * gate
    if gate_tan is not None:
        y_tan = y_tan + a.to(accumulate_dtype(a)) * gate_tan
    return y, y_tan.to(x_tan.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (diffusers' FP32LayerNorm), optional affine, with tangent.

    It normalizes the token stream, which is sequence-sharded under sequence parallelism;
    the affine parameters' gradients are then summed over the tensor-parallel group.
    """

    def __init__(self, dim: int, eps: float, affine: bool):
        super().__init__()
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x, x_tan=None):
        w = None if self.weight is None else grad_sum_over_sequence_shards(self.weight).to(accumulate_dtype(x))
        b = None if self.bias is None else grad_sum_over_sequence_shards(self.bias).to(accumulate_dtype(x))
        return layer_norm(x, x_tan, self.eps, w, b)


def normalized(norm: LayerNorm, x, x_tan, shift=None, shift_tan=None, scale=None, scale_tan=None):
    """norm(x), adaLN-modulated when shift and scale are given, in x's dtype (the next linear's input)."""
    if use_fused_ops(x, x_tan, shift, scale):
        return fused_norm_modulate(x, x_tan, norm.eps, shift, shift_tan, scale, scale_tan, norm.weight, norm.bias)
    h, h_tan = norm(x, x_tan)
    if shift is not None:
        h, h_tan = modulate(h, h_tan, shift, shift_tan, scale, scale_tan)
    return h.to(x.dtype), None if h_tan is None else h_tan.to(x.dtype)
