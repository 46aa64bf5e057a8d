"""LayerNorm followed by adaLN modulation (or an affine), primal and tangent in one Triton kernel.

Why our own kernel: the tangent pass needs y = (1 + scale) LN(x) + shift together with its
forward-mode derivative along (x_tan, shift_tan, scale_tan). Fused LayerNorm kernels (Apex,
Transformer Engine, Liger) compute the primal and its backward, none a tangent; in PyTorch the
two take about ten separate fp32 passes over the [B, S, D] activations. Here one program reads a
token's row of x and x_tan once, and writes y and y_tan:

    n = (x - mean x) rstd,  rstd = 1 / sqrt(var x + eps)
    n_tan = rstd (x_tan_c - n mean(n x_tan_c)),  x_tan_c = x_tan - mean x_tan
    y = n (1 + scale) + shift,  y_tan = n_tan (1 + scale) + n scale_tan + shift_tan
    (affine instead: y = n w + b, y_tan = n_tan w)

Math in fp32, inputs and outputs in bf16 / fp16 / fp32. The modulation is per sample
([B, 1, D]) or per token ([B, S, D], Wan2.2 TI2V's per-token times); it is read through strides,
so neither is materialized at [B, S, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_modulate_kernel(X, X_TAN, Y, Y_TAN, W, BIAS, SHIFT, SCALE, SHIFT_TAN, SCALE_TAN,
                          S, D, stride_mb, stride_ms, stride_tb, stride_ts, eps,
                          HAS_TAN: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr,
                          HAS_MOD_TAN: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    n = xc * rstd
    b = row // S
    s = row % S
    if HAS_MOD:
        moffs = b * stride_mb + s * stride_ms + cols
        gain = 1.0 + tl.load(SCALE + moffs, mask=mask, other=0.0).to(tl.float32)
        y = n * gain + tl.load(SHIFT + moffs, mask=mask, other=0.0).to(tl.float32)
    elif HAS_AFFINE:
        gain = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = n * gain + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        y = n
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_TAN:
        xt = tl.load(X_TAN + offs, mask=mask, other=0.0).to(tl.float32)
        xt_c = tl.where(mask, xt - tl.sum(xt, axis=0) / D, 0.0)
        n_tan = rstd * (xt_c - n * (tl.sum(n * xt_c, axis=0) / D))
        if HAS_MOD or HAS_AFFINE:
            y_tan = n_tan * gain
        else:
            y_tan = n_tan
        if HAS_MOD_TAN:
            toffs = b * stride_tb + s * stride_ts + cols
            y_tan += n * tl.load(SCALE_TAN + toffs, mask=mask, other=0.0).to(tl.float32)
            y_tan += tl.load(SHIFT_TAN + toffs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y_TAN + offs, y_tan.to(Y_TAN.dtype.element_ty), mask=mask)


def row_warps(block: int) -> int:
    """Warps for a program that owns one row of ``block`` elements."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def token_strides(m: torch.Tensor, b: int, s: int, d: int) -> tuple[torch.Tensor, int, int]:
    """A per-sample [B, 1, D] or per-token [B, S, D] tensor as (tensor, batch stride, token stride)
    over the [B, S, D] token grid, without materializing the broadcast."""
    m = m.expand(b, s, d)
    if m.stride(2) != 1:
        m = m.contiguous()
    return m, m.stride(0), m.stride(1)


def norm_modulate(x, x_tan, eps: float, shift=None, shift_tan=None, scale=None, scale_tan=None,
                  weight=None, bias=None, out_dtype: torch.dtype | None = None):
    """(y, y_tan) of LN(x) modulated by (shift, scale) or, with ``weight``/``bias``, affine.

    x, x_tan [B, S, D]; shift, scale (and their tangents, given together or not at all)
    [B, 1, D] or [B, S, D]; weight, bias [D]. y and y_tan in ``out_dtype`` (default x's).
    x_tan None: primal only (y_tan None).
    """
    if x.dim() != 3:
        raise ValueError(f"norm_modulate: x must be [B, S, D], got {tuple(x.shape)}")
    if (shift is None) != (scale is None) or (shift_tan is None) != (scale_tan is None):
        raise ValueError("norm_modulate: shift and scale (and their tangents) come together")
    if shift is not None and weight is not None:
        raise ValueError("norm_modulate: modulation or affine, not both")
    B, S, D = x.shape
    x = x.contiguous()
    out_dtype = out_dtype or x.dtype
    y = torch.empty(B, S, D, device=x.device, dtype=out_dtype)
    has_tan = x_tan is not None
    y_tan = torch.empty_like(y) if has_tan else None
    x_tan = x_tan.contiguous() if has_tan else x
    sb = ss = tb = ts = 0
    if shift is not None:
        shift, sb, ss = token_strides(shift, B, S, D)
        scale, sb2, ss2 = token_strides(scale, B, S, D)
        if (sb, ss) != (sb2, ss2):
            shift, scale = shift.contiguous(), scale.contiguous()
            sb, ss = shift.stride(0), shift.stride(1)
    has_mod_tan = has_tan and shift_tan is not None
    if has_mod_tan:
        shift_tan, tb, ts = token_strides(shift_tan, B, S, D)
        scale_tan, tb2, ts2 = token_strides(scale_tan, B, S, D)
        if (tb, ts) != (tb2, ts2):
            shift_tan, scale_tan = shift_tan.contiguous(), scale_tan.contiguous()
            tb, ts = shift_tan.stride(0), shift_tan.stride(1)
    has_affine = weight is not None
    if has_affine and bias is None:
        bias = torch.zeros_like(weight)
    dummy = x
    block = triton.next_power_of_2(D)
    if B * S:
        _norm_modulate_kernel[(B * S,)](
            x, x_tan, y, y_tan if has_tan else y, weight if has_affine else dummy, bias if has_affine else dummy,
            shift if shift is not None else dummy, scale if scale is not None else dummy,
            shift_tan if has_mod_tan else dummy, scale_tan if has_mod_tan else dummy,
            S, D, sb, ss, tb, ts, float(eps),
            HAS_TAN=has_tan, HAS_AFFINE=has_affine, HAS_MOD=shift is not None, HAS_MOD_TAN=has_mod_tan,
            BLOCK_D=block, num_warps=row_warps(block))
    return y, y_tan
