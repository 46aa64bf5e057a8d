"""Choose the attention implementation.

The backend is picked per call: ``RCM_ATTENTION_BACKEND`` (``auto``, ``triton``, ``reference``)
or the ``attention_backend`` context manager override the default, which is the fused
Triton kernel for CUDA tensors and plain math otherwise. Plain math is what the float64
oracle tests run, so the model code never needs to know which one it got.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.nn.functional as F

from .reference import attention_reference, attention_with_tangent_reference

_VALID = ("auto", "triton", "reference")
_override: list[str] = []


@contextlib.contextmanager
def attention_backend(name: str):
    """Force a backend inside a block, e.g. ``with attention_backend("reference"):``."""
    if name not in _VALID:
        raise ValueError(f"attention backend must be one of {_VALID}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def _backend_for(x: torch.Tensor) -> str:
    name = _override[-1] if _override else os.environ.get("RCM_ATTENTION_BACKEND", "auto")
    if name not in _VALID:
        raise ValueError(f"RCM_ATTENTION_BACKEND must be one of {_VALID}, got {name!r}")
    if name == "auto":
        return "triton" if x.is_cuda else "reference"
    return name


def attention(q, k, v, softmax_scale: float | None = None) -> torch.Tensor:
    """Differentiable attention, [B, S, H, D] in and out."""
    if _backend_for(q) == "reference":
        return attention_reference(q, k, v, softmax_scale)
    # CUDA: PyTorch SDPA picks cuDNN / flash for the forward and the backward.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale
    )
    return out.transpose(1, 2)


def attention_with_tangent(q, k, v, tq, tk=None, tv=None, softmax_scale: float | None = None, *,
                           kv_len=None):
    """(out, tout, lse, tlse) of attention; see ``reference.attention_with_tangent_reference``.

    ``kv_len`` (int or int tensor [B], optional) excludes keys at positions >= kv_len (padded
    tails in ring attention); rows with no valid key give lse = -inf and zero outputs.
    Inputs the fused kernel does not support (head dim > 128, other dtypes) fall back to the
    plain-math reference with a one-time warning.
    """
    if _backend_for(q) == "reference":
        return attention_with_tangent_reference(q, k, v, tq, tk, tv, softmax_scale, kv_len=kv_len)
    from .triton_attention import triton_attention_supported, triton_attention_with_tangent

    if not triton_attention_supported(q, k, v):
        _warn_fallback(q, k, v)
        return attention_with_tangent_reference(q, k, v, tq, tk, tv, softmax_scale, kv_len=kv_len)
    return triton_attention_with_tangent(q, k, v, tq, tk, tv, softmax_scale, kv_len=kv_len)


_warned: set = set()


def _warn_fallback(q, k, v) -> None:
    key = (q.dtype, q.shape[-1], k.shape[-1], v.shape[-1])
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"attention_with_tangent: fused Triton kernel does not support dtype={q.dtype}, "
            f"head dims q/k/v={key[1:]}; using the plain-math reference (O(L^2) memory)",
            stacklevel=3,
        )
