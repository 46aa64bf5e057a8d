"""Test-wide settings: float64 oracles need deterministic CPU math; Triton kernels run
under the interpreter when no GPU is present (must be set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
