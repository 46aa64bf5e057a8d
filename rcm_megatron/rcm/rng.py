"""Layout-invariant randomness (docs/design.md §5.6).

Every draw is keyed by (seed, iteration, global sample index, stream name), never by rank:
each sample gets its own ``torch.Generator`` seeded from a stable hash of that key. A batch
split any way over TP/CP/PP/DP ranks therefore draws exactly what one process draws for
the whole global batch, which is what lets every layout be tested against the oracle.

Draws happen on CPU and are then moved: the streams are identical on CPU and GPU (GPU runs
reproduce CPU oracles), at the price of a host draw and copy of the per-sample latent noise,
small next to a DiT forward.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

Indices = Sequence[int] | Tensor


def stable_seed(seed: int, iteration: int, index: int, stream: str) -> int:
    """63-bit seed from a keyed blake2b hash (Python's hash() is salted per process)."""
    h = hashlib.blake2b(digest_size=8, person=b"rcm-rng")
    h.update(struct.pack("<qqq", int(seed), int(iteration), int(index)))
    h.update(stream.encode("utf-8"))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def index_list(indices: Indices) -> list[int]:
    if isinstance(indices, Tensor):
        if indices.dim() != 1 or indices.is_floating_point():
            raise ValueError(f"indices: expected a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
        return [int(i) for i in indices.tolist()]
    return [int(i) for i in indices]


class KeyedRNG:
    """Per-sample random draws for one (seed, iteration)."""

    def __init__(self, seed: int, iteration: int):
        self.seed = int(seed)
        self.iteration = int(iteration)

    def generator(self, stream: str, index: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(stable_seed(self.seed, self.iteration, index, stream))
        return g

    def _draw(self, fn, stream: str, indices: Indices, shape, dtype, device) -> Tensor:
        idx = index_list(indices)
        shape = tuple(shape)
        out = torch.empty((len(idx), *shape), dtype=dtype)
        for row, i in enumerate(idx):
            out[row] = fn(shape, generator=self.generator(stream, i), dtype=dtype)
        return out if device is None else out.to(device)

    def normal(self, stream: str, indices: Indices, shape=(), *, dtype=torch.float64, device=None) -> Tensor:
        """Standard normal [B, *shape]."""
        return self._draw(torch.randn, stream, indices, shape, dtype, device)

    def uniform(self, stream: str, indices: Indices, shape=(), *, dtype=torch.float64, device=None) -> Tensor:
        """U[0, 1) [B, *shape]."""
        return self._draw(torch.rand, stream, indices, shape, dtype, device)

    def randint(self, stream: str, indices: Indices, low: int, high: int, *, device=None) -> Tensor:
        """One integer in [low, high) per sample, int64 [B]."""
        idx = index_list(indices)
        vals = [int(torch.randint(low, high, (1,), generator=self.generator(stream, i))) for i in idx]
        return torch.tensor(vals, dtype=torch.int64, device=device)
