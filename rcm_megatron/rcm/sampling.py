"""Few-step sampling with the distilled student (docs/design.md §2.7).

N steps at times [atan(sigma_max)] + mid[:N-1] + [0], mid = (1.3, 1.0, 0.6) (paper) or
(1.5, 1.4, 1.0) (official code). Start from x = eps; each step x0 = student x0_hat(x, t),
then x = cos t' x0 + sin t' eps' with fresh noise; the output is the last x0 (the final
time 0 is never evaluated). It is the training rollout with one schedule for all samples,
so its noise is keyed the same way (stream '{stream}.noise', '{stream}.renoise.k').
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .conditioning import Conditioning
from .protocol import VelocityNet
from .rng import Indices, KeyedRNG, index_list
from .rollout import rollout

PAPER_MID_TIMES = (1.3, 1.0, 0.6)
OFFICIAL_MID_TIMES = (1.5, 1.4, 1.0)


def sampling_times(num_steps: int, mid_times=OFFICIAL_MID_TIMES, sigma_max: float = 80.0) -> list[float]:
    if not 1 <= num_steps <= len(mid_times) + 1:
        raise ValueError(f"num_steps: expected 1..{len(mid_times) + 1} for mid_times {tuple(mid_times)}, got {num_steps}")
    return [math.atan(sigma_max), *[float(t) for t in mid_times[: num_steps - 1]], 0.0]


@torch.no_grad()
def sample(
    student: VelocityNet, context: Tensor, latent_shape: tuple[int, ...], indices: Indices, *, seed: int,
    num_steps: int = 4, mid_times=OFFICIAL_MID_TIMES, sigma_max: float = 80.0, iteration: int = 0,
    stream: str = "sample", cond: Conditioning | None = None,
) -> Tensor:
    """Latents [B, *latent_shape] (float64) for prompts ``context`` [B,L,D] and image
    conditioning ``cond``; sample i's noise is keyed by (seed, iteration, indices[i], stream)."""
    b = len(index_list(indices))
    times = torch.tensor(sampling_times(num_steps, mid_times, sigma_max)[:num_steps], dtype=torch.float64)
    res = rollout(student, tuple(latent_shape), times.expand(b, -1), torch.full((b,), num_steps),
                  context, KeyedRNG(seed, iteration), stream, indices, cond)
    return res.x0
