"""The message that crosses a pipeline stage boundary: a list of tensors (tokens, their tangent,
the embedded text; None for a missing one) packed byte-wise into ONE uint8 buffer, and a small
int64 header (dtypes and shapes) that says how to unpack it. Each tensor starts 64-byte aligned
so its dtype view is legal. (Not to be confused with ``mappings.pack``, which stacks a primal and
its tangent for one collective.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
           torch.bool)
_MAX_TENSORS, _MAX_DIMS = 8, 6
_SLOT = 2 + _MAX_DIMS  # per tensor: dtype code (-1: None), ndim, dims
HEADER_LEN = 1 + _MAX_TENSORS * _SLOT
_ALIGN = 64  # bytes; every packed tensor starts aligned so its dtype view is legal


@dataclass(frozen=True)
class Spec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def specs_of(tensors: Sequence[torch.Tensor | None]) -> list[Spec | None]:
    return [None if t is None else Spec(t.dtype, tuple(t.shape)) for t in tensors]


def encode_header(specs: Sequence[Spec | None]) -> torch.Tensor:
    if len(specs) > _MAX_TENSORS:
        raise ValueError(f"a stage boundary carries at most {_MAX_TENSORS} tensors, got {len(specs)}")
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0] = len(specs)
    for i, s in enumerate(specs):
        base = 1 + i * _SLOT
        if s is None:
            h[base] = -1
            continue
        if len(s.shape) > _MAX_DIMS:
            raise ValueError(f"tensors crossing a stage boundary have at most {_MAX_DIMS} dims, got {s.shape}")
        h[base] = _DTYPES.index(s.dtype)
        h[base + 1] = len(s.shape)
        h[base + 2: base + 2 + len(s.shape)] = torch.tensor(s.shape, dtype=torch.int64)
    return h


def decode_header(h: torch.Tensor) -> list[Spec | None]:
    v = h.tolist()
    out = []
    for i in range(int(v[0])):
        base = 1 + i * _SLOT
        if v[base] < 0:
            out.append(None)
            continue
        nd = int(v[base + 1])
        out.append(Spec(_DTYPES[int(v[base])], tuple(int(d) for d in v[base + 2: base + 2 + nd])))
    return out


def packed_nbytes(specs: Sequence[Spec | None]) -> int:
    return sum(_aligned(s.nbytes) for s in specs if s is not None)


def pack_tensors(tensors: Sequence[torch.Tensor | None], device) -> torch.Tensor:
    """One uint8 buffer holding every tensor (None slots take no space)."""
    specs = specs_of(tensors)
    buf = torch.empty(packed_nbytes(specs), dtype=torch.uint8, device=device)
    off = 0
    for t, s in zip(tensors, specs):
        if t is None:
            continue
        buf[off: off + s.nbytes].view(s.dtype).view(s.shape).copy_(t.detach())
        off += _aligned(s.nbytes)
    return buf


def unpack_tensors(buf: torch.Tensor, specs: Sequence[Spec | None]) -> list[torch.Tensor | None]:
    """Views of ``buf`` laid out as ``pack_tensors`` wrote them."""
    out, off = [], 0
    for s in specs:
        if s is None:
            out.append(None)
            continue
        out.append(buf[off: off + s.nbytes].view(s.dtype).view(s.shape))
        off += _aligned(s.nbytes)
    return out
