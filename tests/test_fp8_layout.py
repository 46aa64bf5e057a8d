"""The FP8 activation operand is row-major whatever the activation's layout: cuBLASLt's FP8 product
multiplies a row-major by a column-major matrix only, and refused a column-major fp32 activation on an
H100 ("Only multiplication of row-major and column-major matrices is supported by cuBLASLt")."""

import torch

from rcm_megatron.kernels.fp8 import fp8_linear, quantize_rows


def test_quantize_rows_of_a_transposed_view_is_row_major():
    x = torch.randn(48, 32).t()  # [32, 48], column-major
    assert not x.is_contiguous()
    xq, scale = quantize_rows(x)
    assert xq.is_contiguous() and xq.shape == (32, 48) and scale.shape == (32, 1)
    assert torch.allclose(xq.float() * scale, x, rtol=0.07, atol=1e-6)


def test_fp8_linear_of_a_transposed_view_equals_the_contiguous_one():
    w = torch.randn(64, 48)
    wq, ws = quantize_rows(w)
    x = torch.randn(48, 32).t()
    torch.testing.assert_close(fp8_linear(x, wq, ws), fp8_linear(x.contiguous(), wq, ws))
