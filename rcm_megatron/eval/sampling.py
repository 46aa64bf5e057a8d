"""Samplers for evaluation: batched wrappers around the multi-step teacher
(rcm_megatron.rcm.teacher_sampling.euler_sample: Euler on Wan's shifted rectified-flow grid with
CFG) and the student's few-step sampler (rcm_megatron.rcm.sampling.sample).

Noise is keyed per sample index like the rest of the stack (stream '{stream}.noise'), so a
sample does not depend on the batch it is drawn in and chunking changes nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rcm.conditioning import Conditioning
from ..rcm.rng import index_list
from ..rcm.sampling import OFFICIAL_MID_TIMES, sample as student_sample_fn
from ..rcm.teacher_sampling import euler_sample


def _in_batches(sample_one, context: Tensor, indices, batch_size: int, cond: Conditioning | None = None) -> Tensor:
    """``sample_one(context_chunk, index_chunk, cond_chunk)`` over chunks of ``batch_size`` prompts, concatenated."""
    idx = index_list(indices)
    part = lambda lo: None if cond is None else cond.select(torch.arange(lo, min(lo + batch_size, len(idx))))  # noqa: E731
    return torch.cat([sample_one(context[lo:lo + batch_size], idx[lo:lo + batch_size], part(lo))
                      for lo in range(0, len(idx), batch_size)])


@torch.no_grad()
def teacher_sample(net, context: Tensor, uncond_context: Tensor, latent_shape, indices, *, seed: int,
                   steps: int = 50, cfg_scale: float = 1.0, shift: float = 3.0, stream: str = "teacher",
                   batch_size: int = 512, cond: Conditioning | None = None) -> Tensor:
    """Latents [B, *latent_shape] (float64) for prompts ``context`` [B, L, D] with ``steps`` Euler steps."""
    return _in_batches(lambda c, i, k: euler_sample(net, c, uncond_context, tuple(latent_shape), i, seed=seed,
                                                    num_steps=steps, guidance_scale=cfg_scale, shift=shift,
                                                    stream=stream, cond=k), context, indices, batch_size, cond)


@torch.no_grad()
def student_sample(net, context: Tensor, latent_shape, indices, *, seed: int, num_steps: int,
                   mid_times=OFFICIAL_MID_TIMES, sigma_max: float = 80.0, stream: str = "sample",
                   batch_size: int = 512, cond: Conditioning | None = None) -> Tensor:
    """rcm.sampling.sample in chunks of ``batch_size`` (per-sample keyed noise: chunking changes nothing)."""
    return _in_batches(lambda c, i, k: student_sample_fn(net, c, tuple(latent_shape), i, seed=seed,
                                                         num_steps=num_steps, mid_times=mid_times, sigma_max=sigma_max,
                                                         stream=stream, cond=k),
                       context, indices, batch_size, cond)
