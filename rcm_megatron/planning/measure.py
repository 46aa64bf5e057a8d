"""Measured memory of a pass, to validate the planner's formulas (CPU tests, GPU slices).

- ``saved_tensor_bytes``: bytes autograd keeps for backward (``torch.autograd.graph.
  saved_tensors_hooks``), each storage counted once (views of one tensor share it; parameters
  are excluded: they are model state, not activations).
- ``LiveTensorPeak``: the peak of bytes held by live tensors created inside the block, on any
  device (a ``TorchDispatchMode`` that records each new storage and forgets it when freed), so
  a CPU run gives the working set a GPU allocator would see, without its rounding and caching.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


@contextlib.contextmanager
def saved_tensor_bytes(exclude=()):
    """``with saved_tensor_bytes(model.parameters()) as saved: loss = f(x)``; then ``saved["bytes"]``
    is what autograd saved for backward, storages counted once."""
    skip = {_storage_key(p)[0] for p in exclude}
    seen: dict = {}
    out = {"bytes": 0, "tensors": 0}

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in skip and key not in seen:
            seen[key] = nbytes
            out["bytes"] += nbytes
            out["tensors"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensors created under the mode and still alive (``peak``; ``live`` now).

    Tensors that exist before entering count as zero: the peak is the pass's own working set.
    ``paused()`` stops recording (a fused kernel's scratch that a reference implementation would
    otherwise inflate); its outputs are recorded on return.
    """

    def __init__(self, ignore_shapes=()):
        """``ignore_shapes``: shapes never counted (CPU BLAS keeps transposed copies of weights
        that a GPU does not make: pass the parameters' shapes and their transposes)."""
        super().__init__()
        self.ignore = {tuple(s) for s in ignore_shapes}
        self.live = 0
        self.peak = 0
        self._alive: dict = {}
        self._pause = 0

    def _record(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or tuple(t.shape) in self.ignore:
            return
        key, nbytes = _storage_key(t)
        if key in self._alive or nbytes == 0:
            return
        self._alive[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t.untyped_storage(), self._free, key)

    def _free(self, key):
        self.live -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._pause:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                self._record(t)
        return out

    @contextlib.contextmanager
    def paused(self):
        self._pause += 1
        try:
            yield
        finally:
            self._pause -= 1

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "LiveTensorPeak":
        """A tracker that ignores weight-shaped tensors of ``model`` (and their transposes)."""
        shapes = set()
        for p in model.parameters():
            shapes.add(tuple(p.shape))
            if p.dim() == 2:
                shapes.add(tuple(p.shape[::-1]))
        return cls(shapes)

    def record(self, *tensors):
        for t in tensors:
            self._record(t)


@contextlib.contextmanager
def fused_attention_outputs_only(tracker: LiveTensorPeak):
    """Count only the outputs of attention-with-tangent (what the fused Triton kernel allocates:
    out, out_tan, lse, lse_tan; its tiles live in shared memory), not the score matrices of the
    plain-math reference that runs on CPU."""
    from ..kernels import dispatch

    ref = dispatch.attention_with_tangent_reference

    def outputs_only(*args, **kwargs):
        with tracker.paused():
            out = ref(*args, **kwargs)
        tracker.record(*out)
        return out

    dispatch.attention_with_tangent_reference = outputs_only
    try:
        yield
    finally:
        dispatch.attention_with_tangent_reference = ref
