"""Bytes the memory-bound (non-GEMM, non-attention) work of a pass moves, counted on the meta device.

Norms, modulation, RoPE, GELU, residual adds, casts: their time is bytes / achieved bandwidth, and
their share of a pass shrinks with the width (bytes ~ S D, GEMM FLOPs ~ S D^2), which is why
per-pass efficiencies measured at Wan-1.3B over-predict Wan-14B's time. Rather than a hand count
that drifts from the code, the model itself runs on the meta device (no memory, no compute) under
a ``TorchDispatchMode`` that sums the bytes read and written by every op that is not a matmul, a
view or attention (attention's traffic belongs to its own rate). The count is per sample, in the
compute dtype, linear in the tokens (two token counts fit ``a + b S``: the text and time parts do
not grow with S); attention runs as a stand-in that only makes its outputs (what the fused
kernels write). Eager execution, as the trainer's default path (compiled blocks fuse some of it).
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "dot", "mv"}
_FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "zeros_like", "detach", "lift_fresh", "alias"}
KINDS = ("forward", "tangent", "with_grad")  # with_grad: forward with graph + backward, no recompute


class _ByteCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if self.paused or func.is_view or name in _GEMM_OPS or name in _FREE_OPS:
            return out
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def _stand_ins(counter: _ByteCounter):
    from ..kernels import dispatch

    ref, ref_tan = dispatch.attention_reference, dispatch.attention_with_tangent_reference

    class Attn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale):
            ctx.shapes = (q, k, v)
            counter.paused += 1
            try:
                return ref(q, k, v, scale)
            finally:
                counter.paused -= 1

        @staticmethod
        def backward(ctx, grad):
            counter.paused += 1
            try:
                return (*(torch.empty_like(t) for t in ctx.shapes), None)
            finally:
                counter.paused -= 1

    def attention(q, k, v, softmax_scale=None):
        return Attn.apply(q, k, v, softmax_scale)

    def attention_with_tangent(*args, **kwargs):
        counter.paused += 1
        try:
            return ref_tan(*args, **kwargs)
        finally:
            counter.paused -= 1

    return dispatch, {"attention_reference": attention, "attention_with_tangent_reference": attention_with_tangent}


def _count(cfg, grid: tuple[int, int, int], text_len: int, kind: str, dtype: torch.dtype) -> int:
    from ..models import WanDiT

    counter = _ByteCounter()
    dispatch, patches = _stand_ins(counter)
    saved = {k: getattr(dispatch, k) for k in patches}
    pt, ph, pw = cfg.patch_size
    shape = (1, cfg.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)
    with torch.device("meta"):
        model = WanDiT(cfg).to_dtype(dtype)
        x, x_tan = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        t, t_tan = torch.full((1,), 500.0), torch.ones(1)
        ctx = torch.empty(1, text_len, cfg.text_dim, dtype=dtype)
    model.requires_grad_(kind == "with_grad")
    try:
        for k, fn in patches.items():
            setattr(dispatch, k, fn)
        with counter:
            if kind == "forward":
                with torch.no_grad():
                    model(x, t, ctx)
            elif kind == "tangent":
                with torch.no_grad():
                    model.forward_with_tangent(x, t, ctx, x_tan, t_tan)
            else:
                model(x, t, ctx).float().square().mean().backward()
    finally:
        for k, fn in saved.items():
            setattr(dispatch, k, fn)
    return counter.bytes


@functools.lru_cache(maxsize=64)
def _fit(cfg, text_len: int, kind: str, dtype: torch.dtype) -> tuple[float, float, float, float]:
    """Bytes of one sample's pass = fixed + per_token S + layers (per_layer + per_layer_token S):
    four counts of one- and two-block models at 16 and 32 tokens (meta device, ~1 s)."""
    small, large = (1, 4, 4), (2, 4, 4)  # 16 and 32 tokens
    c = {(n, s): _count(cfg.replace(num_layers=n), g, text_len, kind, dtype)
         for n in (1, 2) for s, g in ((16, small), (32, large))}
    layer16, layer32 = c[2, 16] - c[1, 16], c[2, 32] - c[1, 32]
    per_layer_token = (layer32 - layer16) / 16
    per_layer = layer16 - 16 * per_layer_token
    rest16, rest32 = c[1, 16] - layer16, c[1, 32] - layer32
    per_token = (rest32 - rest16) / 16
    return rest16 - 16 * per_token, per_token, per_layer, per_layer_token


def elementwise_bytes(cfg, tokens: float, text_len: int = 512, kind: str = "forward",
                      dtype: torch.dtype = torch.bfloat16, layers: int | None = None) -> float:
    """Bytes the non-GEMM, non-attention ops of one sample's ``kind`` pass (``KINDS``) move, with
    ``layers`` blocks (default: the model's)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    fixed, per_token, per_layer, per_layer_token = _fit(cfg.replace(num_layers=1), int(text_len), kind, dtype)
    n = cfg.num_layers if layers is None else layers
    return fixed + per_token * tokens + n * (per_layer + per_layer_token * tokens)


def bytes_moved(fn) -> int:
    """Bytes ``fn()``'s memory-bound ops move, counted as ``elementwise_bytes`` counts them (any device):
    a benchmark times ``fn`` and divides, so its bandwidth and the planner's bytes agree on what a byte is."""
    counter = _ByteCounter()
    with counter:
        fn()
    return counter.bytes
