"""FP8 (e4m3) matrix products for the frozen teacher (``--fp8-teacher``).

The teacher never trains, so its linear weights are quantized once, per output row (scale =
row amax / 448, the e4m3 maximum), and kept in FP8: 1 byte per weight plus one fp32 scale per
row, against 2 in bf16. Activations are quantized per token row at call time (dynamic scales).
The product runs in ``torch._scaled_mm`` on every device: cuBLASLt FP8 on H100/H200 (about twice
the bf16 rate), torch's reference kernel on CPU (as fast as the dequantized fp32 product there,
so the CPU tests run the real path). It accumulates in fp32 and writes the dtype F.linear would
(the activation's, or autocast's); on CUDA row-wise scaling writes bf16 only, so an fp32 output is
bf16 cast up.
Row-wise scales keep the error of one outlier row (or output channel) from spreading to the others.
Finer scales would not cut the error further: it is e4m3's 3-bit mantissa (relative rounding, 2^-4, across
2^15 of range), as large with an unlimited range as with row scales on the trained toy teacher
(docs/quality.md, "FP8 teacher"). What does cut it is keeping the first and last block in the teacher's own
precision (``--first-last-layers-bf16``, Megatron-LM's flag): there the first block carries most of the
low-noise error and the last block most of the high-noise error.

Under tensor parallelism each rank quantizes its own shard: a column-parallel shard holds whole
output rows (the same scales as TP = 1), a row-parallel shard a slice of each row (its own, finer
scales); row-parallel partial sums are reduced after the dequantized output, as in bf16.
No tangent ever goes through here: the teacher runs primal, no-grad passes only.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_MIN_SCALE = 1e-12
MIN_CUDA_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada / Hopper and newer


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8, scale [rows, 1] fp32) with x ~= x_fp8 * scale, one scale per row of the 2-D x."""
    xf = x.float().contiguous()  # row-major: cuBLASLt multiplies row-major by column-major only
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) with W given as (weight_fp8 [N, K], weight_scale [N, 1]); y in x's dtype (autocast's
    dtype where autocast is on, as F.linear: an fp32 activation under bf16 autocast gives bf16).

    x [..., K] in a float dtype; its rows are quantized here."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("an FP8-frozen linear (the --fp8-teacher teacher) runs no-grad passes only")
    shape = x.shape
    xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
    dev = x.device.type  # the output dtype F.linear would give: autocast's where it is on, else the activation's
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    y = torch._scaled_mm(xq, weight_fp8.t(), scale_a=xs, scale_b=weight_scale.t(),
                         out_dtype=torch.bfloat16 if x.is_cuda else dtype).to(dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], weight_fp8.shape[0])


def block_in_fp8(layer: int, num_layers: int, num_layers_at_start_in_bf16: int = 0,
                 num_layers_at_end_in_bf16: int = 0) -> bool:
    """Whether block ``layer`` (0-based, of the whole network's ``num_layers``) is quantized: not one of the
    first ``num_layers_at_start_in_bf16`` or last ``num_layers_at_end_in_bf16`` (``--first-last-layers-bf16``)."""
    return num_layers_at_start_in_bf16 <= layer < num_layers - num_layers_at_end_in_bf16


def fp8_supported(in_features: int, out_features: int) -> bool:
    """cuBLASLt FP8 needs both matrix dimensions of the weight to be multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def fp8_teacher_flag_error(mode: str, parameter_sharding: bool, cuda_capability: tuple[int, int] | None) -> str | None:
    """One line when ``--fp8-teacher`` cannot run with these settings (None: it can).
    cuda_capability: the card's (major, minor) when training on CUDA, else None."""
    if mode != "distill":
        return (f"--fp8-teacher quantizes the frozen teacher of --mode distill; --mode {mode} trains the "
                "network itself (no frozen teacher): drop --fp8-teacher")
    if parameter_sharding:
        return "--fp8-teacher does not compose with --use-torch-fsdp2 (FP8 weights are not sharded): drop one"
    if cuda_capability is not None and tuple(cuda_capability) < MIN_CUDA_CAPABILITY:
        major, minor = cuda_capability
        return (f"--fp8-teacher needs FP8 tensor cores (CUDA capability >= 8.9: Ada, Hopper or newer); "
                f"this card is {major}.{minor}: drop --fp8-teacher")
    return None
