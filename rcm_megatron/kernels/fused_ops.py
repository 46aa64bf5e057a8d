"""When the model's elementwise work runs in the fused Triton kernels (``--fused-tangent-ops``).

The fused kernels (``norm_modulate``, ``qk_norm_rope``, ``pointwise``) are forward-only: they serve
the no-grad passes (the student's tangent pass above all, also the teacher's and the rollouts'
primal passes) and never a pass that autograd records. Mode, set by the trainer from its flag,
by ``fused_ops(mode)`` around a block, or by ``RCM_FUSED_TANGENT_OPS``:

- ``auto`` (default): fused on CUDA tensors, PyTorch elsewhere (the float64 oracle tests and the
  CPU toy run keep their exact numbers);
- ``on``: fused wherever Triton runs (CPU tests force it under ``TRITON_INTERPRET=1``);
- ``off``: PyTorch everywhere (the A/B baseline).

Inside ``torch.compile`` (``--compile-blocks``) the PyTorch code is traced instead: the compiler
fuses it itself.
"""

from __future__ import annotations

import contextlib
import os

import torch

MODES = ("auto", "on", "off")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_override: list[str] = []
_mode = ["auto"]


def set_fused_ops(mode: str) -> None:
    """The process-wide mode (the trainer sets 'auto' with ``--fused-tangent-ops``, else 'off')."""
    _mode[0] = _check(mode, "fused tangent ops mode")


@contextlib.contextmanager
def fused_ops(mode: str):
    """Force a mode inside a block, e.g. ``with fused_ops("on"):``."""
    _override.append(_check(mode, "fused tangent ops mode"))
    try:
        yield
    finally:
        _override.pop()


def fused_ops_mode() -> str:
    if _override:
        return _override[-1]
    env = os.environ.get("RCM_FUSED_TANGENT_OPS")
    return _check(env, "RCM_FUSED_TANGENT_OPS") if env else _mode[0]


def use_fused_ops(*tensors: torch.Tensor | None) -> bool:
    """True when the fused kernels should compute an op on these tensors (None entries ignored)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    mode = fused_ops_mode()
    if mode == "off":
        return False
    present = [t for t in tensors if t is not None]
    if any(t.dtype not in KERNEL_DTYPES for t in present):
        return False
    return mode == "on" or all(t.is_cuda for t in present)


def _check(mode, what: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{what} must be one of {MODES}, got {mode!r}")
    return mode
