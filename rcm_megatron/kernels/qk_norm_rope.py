"""Wan's q/k RMSNorm over the whole hidden size, then 3D RoPE, primal and tangent in one Triton kernel.

Why our own kernel: the tangent pass needs RMSNorm (across all heads, with weight) and the
rotary embedding of q and k together with their forward-mode derivatives. Fused RMSNorm and
RoPE kernels (Apex, Transformer Engine, flash-attn's rotary, Liger) carry the primal and its
backward only; in PyTorch the pair costs about a dozen fp32 passes over q and k and their
tangents. Here one program reads a token's row of x and x_tan once and writes both rotated:

    r = 1 / sqrt(mean x^2 + eps),  y = w r x
    y_tan = w r (x_tan - x r^2 mean(x x_tan))
    RoPE (linear, the same rotation for y and y_tan): interleaved pairs (y_2i, y_2i+1) of each head
    rotate by the token's angle table row, as ``models.rope.apply_rope``.

Under tensor parallelism a rank holds a slice of the hidden size (whole heads), and the two sums
(of x^2 and of x x_tan) run over all of it: ``row_sums`` computes this rank's partial sums in one
read, the caller all-reduces them (the model: ``parallel.tensor_parallel.all_reduce_tp_sum``, one
packed collective, as the PyTorch path), and ``qk_norm_rope(..., sums=)`` applies the norm and RoPE.
At TP = 1 the sums stay on chip and x is read once.
Math in fp32, inputs and outputs in bf16 / fp16 / fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm_modulate import row_warps


@triton.jit
def _rotate(e, o, c, s):
    return e * c - o * s, e * s + o * c


@triton.jit
def _qk_norm_rope_kernel(X, X_TAN, Y, Y_TAN, W, COS, SIN, SUMS, S, HALF_D, HALF_HEAD, eps, inv_full,
                         HAS_TAN: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_SUMS: tl.constexpr, BLOCK: tl.constexpr):
    # The row as [BLOCK, 2] (pair index, even/odd): contiguous, vectorized loads; tl.split gives the
    # even and odd channels of every pair.
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    pairs = 2 * j[:, None] + tl.arange(0, 2)[None, :]
    mask = pairs < 2 * HALF_D
    offs = row * 2 * HALF_D + pairs
    xe, xo = tl.split(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32))
    we, wo = tl.split(tl.load(W + pairs, mask=mask, other=0.0).to(tl.float32))
    if HAS_SUMS:  # all-reduced over the tensor-parallel group: [sum x^2, (sum x x_tan)] per row
        if HAS_TAN:
            r = 1.0 / tl.sqrt(tl.load(SUMS + row * 2) * inv_full + eps)
        else:
            r = 1.0 / tl.sqrt(tl.load(SUMS + row) * inv_full + eps)
    else:
        r = 1.0 / tl.sqrt(tl.sum(xe * xe + xo * xo, axis=0) * inv_full + eps)
    ye = xe * r * we
    yo = xo * r * wo
    if HAS_ROPE:
        angle = (row % S) * HALF_HEAD + j % HALF_HEAD
        c = tl.load(COS + angle, mask=j < HALF_D, other=0.0).to(tl.float32)
        s = tl.load(SIN + angle, mask=j < HALF_D, other=0.0).to(tl.float32)
        ye, yo = _rotate(ye, yo, c, s)
    tl.store(Y + offs, tl.join(ye, yo).to(Y.dtype.element_ty), mask=mask)
    if HAS_TAN:
        te, to = tl.split(tl.load(X_TAN + offs, mask=mask, other=0.0).to(tl.float32))
        if HAS_SUMS:
            k = r * r * tl.load(SUMS + row * 2 + 1) * inv_full
        else:
            k = r * r * tl.sum(xe * te + xo * to, axis=0) * inv_full
        ye_tan = we * r * (te - xe * k)
        yo_tan = wo * r * (to - xo * k)
        if HAS_ROPE:
            ye_tan, yo_tan = _rotate(ye_tan, yo_tan, c, s)
        tl.store(Y_TAN + offs, tl.join(ye_tan, yo_tan).to(Y_TAN.dtype.element_ty), mask=mask)


@triton.jit
def _row_sums_kernel(X, X_TAN, SUMS, D, HAS_TAN: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_TAN:
        xt = tl.load(X_TAN + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(SUMS + row * 2, tl.sum(x * x, axis=0))
        tl.store(SUMS + row * 2 + 1, tl.sum(x * xt, axis=0))
    else:
        tl.store(SUMS + row, tl.sum(x * x, axis=0))


def row_sums(x, x_tan=None):
    """This rank's [sum x^2, sum x x_tan] per token, [B, S, 2] fp32 ([B, S, 1] without tangent):
    the partial sums a tensor-parallel RMSNorm all-reduces."""
    B, S, D = x.shape
    x = x.contiguous()
    has_tan = x_tan is not None
    sums = torch.empty(B, S, 2 if has_tan else 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(D)
    if B * S:
        _row_sums_kernel[(B * S,)](x, x_tan.contiguous() if has_tan else x, sums, D, HAS_TAN=has_tan, BLOCK_D=block,
                                   num_warps=row_warps(block))
    return sums


def qk_norm_rope(x, x_tan, weight, eps: float, rope=None, full_size: int | None = None, sums=None):
    """(y, y_tan) [B, S, D] of RMSNorm over the whole hidden size (weight [D]: this rank's slice),
    then RoPE if ``rope`` = (cos, sin) [S, head_dim/2] is given (head_dim = 2 * cos.shape[-1]).

    Tensor parallelism: ``full_size`` is the whole hidden size and ``sums`` the all-reduced
    ``row_sums`` (D < full_size needs them). Outputs in x's dtype; x_tan None: primal only.
    """
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"qk_norm_rope: x must be [B, S, D] with even D, got {tuple(x.shape)}")
    B, S, D = x.shape
    full_size = full_size or D
    if weight.shape != (D,):
        raise ValueError(f"qk_norm_rope: weight must be [{D}] (this rank's hidden size), got {tuple(weight.shape)}")
    has_tan = x_tan is not None
    if (full_size != D and sums is None) or (sums is not None and sums.shape != (B, S, 1 + has_tan)):
        raise ValueError(f"qk_norm_rope: a hidden size of {D} of {full_size} needs the all-reduced row sums "
                         f"[{B}, {S}, {1 + has_tan}], got {None if sums is None else tuple(sums.shape)}")
    x = x.contiguous()
    weight = weight.contiguous()
    x_tan = x_tan.contiguous() if has_tan else x
    y = torch.empty_like(x)
    y_tan = torch.empty_like(x) if has_tan else y
    cos = sin = x
    half_head = 1
    if rope is not None:
        cos, sin = (t.to(torch.float32).contiguous() for t in rope)
        half_head = cos.shape[-1]
        if cos.shape != (S, half_head) or sin.shape != cos.shape or D % (2 * half_head):
            raise ValueError(f"qk_norm_rope: rope tables must be [S={S}, head_dim/2] with head_dim dividing {D}, "
                             f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    has_sums = sums is not None
    sums = sums.to(torch.float32).contiguous() if has_sums else x
    block = triton.next_power_of_2(D // 2)
    if B * S:
        _qk_norm_rope_kernel[(B * S,)](x, x_tan, y, y_tan, weight, cos, sin, sums, S, D // 2, half_head, float(eps),
                                       1.0 / full_size, HAS_TAN=has_tan, HAS_ROPE=rope is not None,
                                       HAS_SUMS=has_sums, BLOCK=block, num_warps=row_warps(block))
    return y, (y_tan if has_tan else None)
