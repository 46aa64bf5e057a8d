"""Choose the attention implementation.

The backend is picked per call: ``RCM_ATTENTION_BACKEND`` (``auto``, ``triton``, ``reference``)
or the ``attention_backend`` context manager override the default, which is the fused
Triton kernel for CUDA tensors and plain math otherwise. Plain math is what the float64
oracle tests run, so the model code never needs to know which one it got.

Training passes run inside ``training_pass(name)`` (the rCM losses and steps name each forward
and backward pass; observers added with ``add_pass_observer`` see each pass begin and end, which
is how benchmarks time passes inside the trainer's own step). There a silent slow path is an error
(``AttentionFallbackError``, naming the pass, dtype and shape) instead of a warning: under
autocast every attention input must be in the autocast dtype (an fp32 q reaching the kernel in
a bf16 run means some layer promoted the activations), and on CUDA the tangent pass must not
fall back to plain math, whose O(L^2) scores (12 x 32760^2 fp32 = 51 GB per layer at Wan 480p)
stall or exhaust the GPU. Outside a named pass (tools, benchmarks) the fallback stays a warning.
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
_passes: list[str] = []
_observers: list = []


class AttentionFallbackError(RuntimeError):
    """A training pass would run attention on a slow path (wrong dtype or plain-math fallback)."""


@contextlib.contextmanager
def training_pass(name: str):
    """Name the training pass the enclosed attention calls belong to (and make fallbacks errors)."""
    _passes.append(name)
    for fn in _observers:
        fn(name, True)
    try:
        yield
    finally:
        for fn in _observers:
            fn(name, False)
        _passes.pop()


def add_pass_observer(fn) -> None:
    """Call ``fn(name, begins: bool)`` at the start and end of every training pass."""
    _observers.append(fn)


def remove_pass_observer(fn) -> None:
    _observers.remove(fn)


def current_pass() -> str | None:
    """The innermost ``training_pass`` name, None outside training passes."""
    return _passes[-1] if _passes else None


def _describe(tensors) -> str:
    return ", ".join(f"{n} {t.dtype} {list(t.shape)}" for n, t in tensors if t is not None)


def _check_training_dtypes(fn: str, **tensors) -> None:
    """Inside a named pass under autocast: every input must be in the autocast dtype (checked in
    eager code; a compiled block is checked when it runs eagerly, e.g. on CPU)."""
    if torch.compiler.is_compiling() or not _passes:
        return
    q = tensors["q"]
    dev = q.device.type
    if not torch.is_autocast_enabled(dev):
        return
    want = torch.get_autocast_dtype(dev)
    bad = [(n, t) for n, t in tensors.items() if t is not None and t.dtype != want]
    if bad:
        raise AttentionFallbackError(
            f"{fn} in pass '{_passes[-1]}': autocast computes in {want} but got {_describe(tensors.items())}; "
            f"a layer promoted the activations, and the fused kernel would run slowly or fall back to plain math")


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
    _check_training_dtypes("attention", q=q, k=k, v=v)
    if _backend_for(q) == "reference":
        return attention_reference(q, k, v, softmax_scale)
    # CUDA: PyTorch SDPA picks cuDNN / flash for the forward and the backward.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale
    )
    return out.transpose(1, 2)


@torch.compiler.disable  # compiled blocks call the fused kernel as it is (a graph break)
def attention_with_tangent(q, k, v, q_tan, k_tan=None, v_tan=None, softmax_scale: float | None = None, *,
                           kv_len=None):
    """(out, out_tan, lse, lse_tan) of attention; see ``reference.attention_with_tangent_reference``.

    ``kv_len`` (int or int tensor [B], optional) excludes keys at positions >= kv_len (padded
    tails in ring attention); rows with no valid key give lse = -inf and zero outputs.
    Inputs the fused kernel does not support (head dim > 128, other dtypes) fall back to the
    plain-math reference with a one-time warning.
    """
    _check_training_dtypes("attention_with_tangent", q=q, k=k, v=v, q_tan=q_tan, k_tan=k_tan, v_tan=v_tan)
    if _backend_for(q) == "reference":
        return attention_with_tangent_reference(q, k, v, q_tan, k_tan, v_tan, softmax_scale, kv_len=kv_len)
    from .triton_attention import triton_attention_supported, triton_attention_with_tangent

    if not triton_attention_supported(q, k, v):
        if _passes:
            raise AttentionFallbackError(
                f"attention_with_tangent in pass '{_passes[-1]}': the fused kernel does not support "
                f"{_describe([('q', q), ('k', k), ('v', v)])} (it needs one dtype, head dim <= 128); the "
                f"plain-math fallback needs O(L^2) memory")
        _warn_fallback(q, k, v)
        return attention_with_tangent_reference(q, k, v, q_tan, k_tan, v_tan, softmax_scale, kv_len=kv_len)
    return triton_attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, softmax_scale, kv_len=kv_len)


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
