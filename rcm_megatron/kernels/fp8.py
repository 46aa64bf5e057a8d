"""FP8 (e4m3) matrix products for the frozen teacher (``--fp8-teacher``).

The teacher never trains, so its linear weights are quantized once, per output row (scale =
row amax / 448, the e4m3 maximum), and kept in FP8: half the bytes of bf16. Activations are
quantized per token row on the fly. The product runs in ``torch._scaled_mm`` (cuBLASLt FP8 on
H100/H200, where it is about twice the bf16 rate), accumulating
in fp32 and writing bf16 (on CPU the same products of the dequantized values, in fp32). Row-wise scales keep the error of one outlier row from spreading to the
others. No tangent ever goes through here: the teacher runs primal passes only.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_MIN_SCALE = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8, scale [rows, 1] fp32) with x ~= x_fp8 * scale, one scale per row of the 2-D x."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) with W given as (weight_fp8 [N, K], weight_scale [N, 1]); y in bf16.

    x [..., K] in any float dtype; its rows are quantized here.
    """
    shape = x.shape
    xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
    if x.is_cuda:
        y = torch._scaled_mm(xq, weight_fp8.t(), scale_a=xs, scale_b=weight_scale.t(), out_dtype=torch.bfloat16)
    else:  # the same products in fp32 (torch's CPU _scaled_mm is a slow reference, 100x slower)
        y = ((xq.float() * xs) @ (weight_fp8.float() * weight_scale).t()).to(torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], weight_fp8.shape[0])


def fp8_supported(in_features: int, out_features: int) -> bool:
    """cuBLASLt FP8 needs both matrix dimensions of the weight to be multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0
