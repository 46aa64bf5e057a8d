"""Which samples form a global batch, independent of the parallel layout.

Iteration i takes the next ``global_batch`` indices of a per-epoch permutation keyed by
the seed; a data-parallel rank takes its contiguous slice. Resuming at iteration i needs
only i, so the data position is exact after a restart.
"""

from __future__ import annotations

import torch


def global_batch_indices(seed: int, iteration: int, global_batch: int, num_samples: int) -> torch.Tensor:
    start = iteration * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.extend(perm[offset:offset + global_batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def local_slice(indices: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    per = len(indices) // dp_size
    return indices[dp_rank * per:(dp_rank + 1) * per]
