"""Elementwise and normalization layers with their tangent rules (docs/design.md §3).

Every function takes the primal and an optional tangent and returns ``(y, ty)``; a tangent
of None means "no tangent pass" and costs nothing. Normalizations compute in at least fp32
(float64 stays float64, so the oracle tests stay exact) and cast back, as diffusers' Wan does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.tensor_parallel import all_reduce_tp_sum, grad_sum_over_sequence_shards


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half types, the tensor's own dtype otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def up(x):
    return None if x is None else x.to(compute_dtype(x))


def layer_norm(x, tx, eps: float, weight=None, bias=None):
    """LayerNorm over the last dim in fp32. Tangent: rstd (tx_c - y mean(y tx_c)) (times weight)."""
    xf = x.to(compute_dtype(x))
    mu = xf.mean(-1, keepdim=True)
    xc = xf - mu
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    y = xc * rstd
    ty = None
    if tx is not None:
        txf = tx.to(xf.dtype)
        txc = txf - txf.mean(-1, keepdim=True)
        ty = rstd * (txc - y * (y * txc).mean(-1, keepdim=True))
        if weight is not None:
            ty = ty * weight
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, ty


def rms_norm_across_heads(x, tx, weight, eps: float, full_size: int):
    """RMSNorm over the whole hidden size (Wan's q/k norm), TP-correct.

    Under tensor parallelism each rank holds a slice of the hidden size; the sums of x^2
    and of x*tx are all-reduced in one packed collective.
    """
    xf = x.to(compute_dtype(x))
    sums = xf.pow(2).sum(-1, keepdim=True)
    if tx is not None:
        txf = tx.to(xf.dtype)
        sums = torch.cat([sums, (xf * txf).sum(-1, keepdim=True)], dim=-1)
    sums = all_reduce_tp_sum(sums)
    r = torch.rsqrt(sums[..., :1] / full_size + eps)
    w = weight.to(xf.dtype)
    y = (xf * r * w).to(x.dtype)
    ty = None
    if tx is not None:
        ty = (w * r * (txf - xf * (r * r) * sums[..., 1:] / full_size)).to(x.dtype)
    return y, ty


_GELU_K = math.sqrt(2.0 / math.pi)


def gelu_tanh(u, tu):
    """GELU with the tanh approximation; tangent f'(u) tu."""
    y = F.gelu(u, approximate="tanh")
    if tu is None:
        return y, None
    uf = u.to(compute_dtype(u))
    z = _GELU_K * (uf + 0.044715 * uf.pow(3))
    th = torch.tanh(z)
    d = 0.5 * (1 + th) + 0.5 * uf * (1 - th * th) * _GELU_K * (1 + 3 * 0.044715 * uf * uf)
    return y, (d * tu.to(uf.dtype)).to(tu.dtype)


def silu(u, tu):
    """SiLU; tangent sigma(u) (1 + u (1 - sigma(u))) tu."""
    y = F.silu(u)
    if tu is None:
        return y, None
    s = torch.sigmoid(u)
    return y, tu * s * (1 + u * (1 - s))


def modulate(n, tn, shift, tshift, scale, tscale):
    """adaLN: n (1 + scale) + shift, with the product rule for the tangent."""
    y = n * (1 + scale) + shift
    if tn is None:
        return y, None
    ty = tn * (1 + scale)
    if tscale is not None:
        ty = ty + n * tscale + tshift
    return y, ty


def gated_residual(x, tx, a, ta, gate, tgate):
    """x + a * gate in fp32, cast back to the residual dtype; product rule for the tangent."""
    y = (x.to(compute_dtype(x)) + a.to(compute_dtype(a)) * gate).to(x.dtype)
    if tx is None:
        return y, None
    ty = tx.to(compute_dtype(tx)) + ta.to(compute_dtype(ta)) * gate
    if tgate is not None:
        ty = ty + a.to(compute_dtype(a)) * tgate
    return y, ty.to(tx.dtype)


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

    def forward(self, x, tx=None):
        w = None if self.weight is None else grad_sum_over_sequence_shards(self.weight).to(compute_dtype(x))
        b = None if self.bias is None else grad_sum_over_sequence_shards(self.bias).to(compute_dtype(x))
        return layer_norm(x, tx, self.eps, w, b)
