"""Samplers for evaluation: the multi-step teacher (Euler on the rectified flow with CFG) and a
batched wrapper around the student's few-step sampler (rcm_megatron.rcm.sampling.sample).

Teacher: x_s = (1 - s) x0 + s eps, the network predicts v = eps - x0 at timestep 1000 s.
Start from x = eps at s = 1 and take ``steps`` Euler steps x <- x + (s' - s) v on Wan's
shifted grid s_i = k u_i / (1 + (k - 1) u_i), u_i = 1 - i/steps (k = ``shift``), down to
s = 0. Guidance: v = v_u + w (v_c - v_u), with v_u at the negative-prompt embedding (both
in one batched forward). Noise is keyed per sample index like the rest of the stack
(stream '{stream}.noise'), so a sample does not depend on the batch it is drawn in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rcm.rng import KeyedRNG, index_list
from ..rcm.sampling import OFFICIAL_MID_TIMES, sample as student_sample_fn


def shifted_grid(steps: int, shift: float = 3.0) -> Tensor:
    """RF times 1 = s_0 > s_1 > ... > s_steps = 0 (float64)."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    u = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def teacher_sample(net, context: Tensor, uncond_context: Tensor, latent_shape, indices, *, seed: int,
                   steps: int = 50, cfg_scale: float = 1.0, shift: float = 3.0, stream: str = "teacher",
                   batch_size: int = 512) -> Tensor:
    """Latents [B, *latent_shape] (float64) for prompts ``context`` [B, L, D] with ``steps`` Euler steps."""
    idx = index_list(indices)
    out = []
    for lo in range(0, len(idx), batch_size):
        sl = slice(lo, lo + batch_size)
        out.append(_teacher_chunk(net, context[sl], uncond_context, tuple(latent_shape), idx[sl], seed, steps,
                                  cfg_scale, shift, stream))
    return torch.cat(out)


def _teacher_chunk(net, context, uncond_context, shape, idx, seed, steps, cfg_scale, shift, stream):
    device = context.device
    dtype = next(net.parameters()).dtype
    b = len(idx)
    x = KeyedRNG(seed, 0).normal(f"{stream}.noise", idx, shape, device=device)
    s = shifted_grid(steps, shift).to(device)
    uncond = uncond_context.reshape(-1, *uncond_context.shape[-2:]).expand(b, -1, -1).to(device)
    guided = cfg_scale != 1.0
    ctx = torch.cat([context, uncond]) if guided else context
    for i in range(steps):
        ts = torch.full((ctx.shape[0],), 1000.0 * float(s[i]), dtype=torch.float32, device=device)
        xin = (torch.cat([x, x]) if guided else x).to(dtype)
        v = net(xin, ts, ctx.to(dtype)).to(torch.float64)
        if guided:
            vc, vu = v.chunk(2)
            v = vu + cfg_scale * (vc - vu)
        x = x + (s[i + 1] - s[i]) * v
    return x


@torch.no_grad()
def student_sample(net, context: Tensor, latent_shape, indices, *, seed: int, num_steps: int,
                   mid_times=OFFICIAL_MID_TIMES, sigma_max: float = 80.0, stream: str = "sample",
                   batch_size: int = 512) -> Tensor:
    """rcm.sampling.sample in chunks of ``batch_size`` (per-sample keyed noise: chunking changes nothing)."""
    idx = index_list(indices)
    out = []
    for lo in range(0, len(idx), batch_size):
        sl = slice(lo, lo + batch_size)
        out.append(student_sample_fn(net, context[sl], tuple(latent_shape), idx[sl], seed=seed, num_steps=num_steps,
                                     mid_times=mid_times, sigma_max=sigma_max, stream=stream))
    return torch.cat(out)
