"""GELU(tanh) and the gated residual, primal and tangent in one Triton kernel each.

Why our own kernels: the tangent pass needs each op's forward-mode derivative beside its value.
Library kernels (PyTorch's, Apex, Transformer Engine) fuse the primal and its backward; computing
the tangent in PyTorch re-reads the inputs for every elementwise step in fp32. Here each input is
read once:

    gelu:          y = u/2 (1 + tanh z),  z = k (u + 0.044715 u^3),  k = sqrt(2/pi)
                   y_tan = (1/2 (1 + tanh z) + u/2 (1 - tanh^2 z) k (1 + 3 * 0.044715 u^2)) u_tan
    gated residual: y = x + gate a,  y_tan = x_tan + gate a_tan + gate_tan a

Math in fp32, inputs and outputs in bf16 / fp16 / fp32; gate per sample ([B, 1, D]) or per token
([B, S, D]), read through strides.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .norm_modulate import row_warps, token_strides

GELU_K = math.sqrt(2.0 / math.pi)
_BLOCK = 1024


@triton.jit
def _tanh(z):
    # tanh(z) = 1 - 2 / (exp(2z) + 1), portable across Triton versions; |z| <= 15 is +-1 in fp32
    # already, the clamp keeps exp finite.
    z = tl.minimum(tl.maximum(z, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _gelu_tanh_kernel(U, U_TAN, Y, Y_TAN, N, K: tl.constexpr, HAS_TAN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    th = _tanh(K * (u + 0.044715 * u * u * u))
    tl.store(Y + offs, (0.5 * u * (1.0 + th)).to(Y.dtype.element_ty), mask=mask)
    if HAS_TAN:
        ut = tl.load(U_TAN + offs, mask=mask, other=0.0).to(tl.float32)
        d = 0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * K * (1.0 + 3.0 * 0.044715 * u * u)
        tl.store(Y_TAN + offs, (d * ut).to(Y_TAN.dtype.element_ty), mask=mask)


def gelu_tanh(u, u_tan):
    """(y, y_tan) of GELU(tanh) in u's and u_tan's dtypes; u_tan None: primal only."""
    u = u.contiguous()
    y = torch.empty_like(u)
    has_tan = u_tan is not None
    u_tan = u_tan.contiguous() if has_tan else u
    y_tan = torch.empty_like(u_tan) if has_tan else y
    n = u.numel()
    if n:
        _gelu_tanh_kernel[(triton.cdiv(n, _BLOCK),)](u, u_tan, y, y_tan, n, K=GELU_K, HAS_TAN=has_tan, BLOCK=_BLOCK,
                                                     num_warps=4)
    return y, (y_tan if has_tan else None)


@triton.jit
def _gated_residual_kernel(X, X_TAN, A, A_TAN, G, G_TAN, Y, Y_TAN, S, D, stride_gb, stride_gs, stride_tb,
                           stride_ts, HAS_TAN: tl.constexpr, HAS_GATE_TAN: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    b = row // S
    s = row % S
    gate = tl.load(G + b * stride_gb + s * stride_gs + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x + a * gate).to(Y.dtype.element_ty), mask=mask)
    if HAS_TAN:
        y_tan = tl.load(X_TAN + offs, mask=mask, other=0.0).to(tl.float32)
        y_tan += tl.load(A_TAN + offs, mask=mask, other=0.0).to(tl.float32) * gate
        if HAS_GATE_TAN:
            y_tan += a * tl.load(G_TAN + b * stride_tb + s * stride_ts + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y_TAN + offs, y_tan.to(Y_TAN.dtype.element_ty), mask=mask)


def gated_residual(x, x_tan, a, a_tan, gate, gate_tan):
    """(y, y_tan) = (x + gate a, x_tan + gate a_tan + gate_tan a) in x's and x_tan's dtypes.

    x, a [B, S, D] (and tangents); gate, gate_tan [B, 1, D] or [B, S, D]. x_tan None: primal only
    (a_tan, gate_tan ignored); gate_tan None: a gate without tangent.
    """
    if x.dim() != 3 or a.shape != x.shape:
        raise ValueError(f"gated_residual: x and a must be [B, S, D] alike, got {tuple(x.shape)}, {tuple(a.shape)}")
    B, S, D = x.shape
    x, a = x.contiguous(), a.contiguous()
    gate, gb, gs = token_strides(gate, B, S, D)
    y = torch.empty_like(x)
    has_tan = x_tan is not None
    has_gate_tan = has_tan and gate_tan is not None
    tb = ts = 0
    if has_tan:
        x_tan, a_tan = x_tan.contiguous(), a_tan.contiguous()
        y_tan = torch.empty_like(x_tan)
    else:
        x_tan = a_tan = y_tan = x
    if has_gate_tan:
        gate_tan, tb, ts = token_strides(gate_tan, B, S, D)
    else:
        gate_tan = gate
    block = triton.next_power_of_2(D)
    if B * S:
        _gated_residual_kernel[(B * S,)](x, x_tan, a, a_tan, gate, gate_tan, y, y_tan, S, D, gb, gs, tb, ts,
                                         HAS_TAN=has_tan, HAS_GATE_TAN=has_gate_tan, BLOCK_D=block,
                                         num_warps=row_warps(block))
    return y, (y_tan if has_tan else None)
