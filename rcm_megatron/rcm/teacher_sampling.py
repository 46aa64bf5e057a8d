"""Multi-step teacher sampling: Euler on Wan's rectified flow with classifier-free guidance.

The flow: x_s = (1 - s) x0 + s eps, the network predicts v = eps - x0 at timestep 1000 s.
Wan samples on the shifted grid s_k = shift u_k / (1 + (shift - 1) u_k), u_k = 1 - k/N
(k = 0..N; shift 3 for 480p in diffusers' Wan pipelines, 5 in Wan's own configs), and
guides with v = v_u + w (v_c - v_u), v_u from the negative-prompt embedding. Euler:
x_{k+1} = x_k + (s_{k+1} - s_k) v_k; at s = 0 the result is x0. Wan's reference sampler is
UniPC (a higher-order solver on the same grid): Euler needs more steps (~50) for the same
quality and is what distillation data synthesis and evaluation need - simple, exact to test.

The starting noise of sample i is keyed by (seed, index i) (rng.KeyedRNG), so any split of
the prompts over ranks or batches produces the same latents. The state stays float64
between steps; the network sees its own dtype (timesteps at least fp32).

Image-to-video (``cond``, conditioning.py): the image is on both CFG sides, condition channels
follow the noisy latents, a given first frame (TI2V) enters clean at timestep 0 in every step and
is the output there (as diffusers' Wan2.2 TI2V pipeline blends it back in).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conditioning import Conditioning, resolve
from .protocol import VelocityNet, net_dtype, timestep_dtype
from .rng import Indices, KeyedRNG, index_list
from .trigflow import RF_TIME_SCALE, wan_time_shift


def shifted_sigmas(num_steps: int, shift: float = 5.0) -> Tensor:
    """Float64 [num_steps + 1] from 1 down to 0 on Wan's shifted grid."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return wan_time_shift(u, shift)


def guided_velocity(net: VelocityNet, x: Tensor, s: float, context: Tensor, uncond_context: Tensor | None,
                    guidance_scale: float, cond: Conditioning | None = None) -> Tensor:
    """v at RF time s (float64), guided unless the scale is 1 or there is no negative prompt."""
    cond = resolve(cond)  # text-to-video: the identity below
    dtype = net_dtype(net)
    ts = torch.full((x.shape[0],), RF_TIME_SCALE * s, dtype=timestep_dtype(dtype), device=x.device)
    ts = cond.token_timestep(ts, x.shape)
    latents = cond.network_input(cond.with_given(x).to(dtype))
    v = net(latents, ts, context, **cond.net_kwargs()).to(torch.float64)
    if uncond_context is None or guidance_scale == 1.0:
        return v
    u = uncond_context.expand(x.shape[0], *uncond_context.shape[-2:]).to(context.dtype)
    vu = net(latents, ts, u, **cond.net_kwargs()).to(torch.float64)
    return vu + guidance_scale * (v - vu)


def initial_noise(context: Tensor, latent_shape, indices: Indices, *, seed: int, stream: str,
                  noise: Tensor | None = None) -> Tensor:
    """Starting noise [B, *latent_shape] (float64) keyed by sample index (stream f'{stream}.noise',
    iteration 0), or ``noise`` when given; shared by every teacher sampler so they start alike."""
    b = context.shape[0]
    idx = index_list(indices)
    if len(idx) != b:
        raise ValueError(f"indices: expected {b} sample indices, got {len(idx)}")
    if noise is None:
        return KeyedRNG(seed, 0).normal(f"{stream}.noise", idx, tuple(latent_shape), device=context.device)
    return noise.to(device=context.device, dtype=torch.float64)


@torch.no_grad()
def euler_sample(net: VelocityNet, context: Tensor, uncond_context: Tensor | None, latent_shape, indices: Indices,
                 *, seed: int, num_steps: int = 50, guidance_scale: float = 5.0, shift: float = 5.0,
                 stream: str = "teacher", noise: Tensor | None = None, callback=None,
                 cond: Conditioning | None = None) -> Tensor:
    """Latents x0 [B, *latent_shape] (float64) for prompt embeddings ``context`` [B, L, D].

    ``uncond_context`` [1 or B, L, D] is the negative prompt; ``noise`` overrides the keyed
    starting noise (stream f'{stream}.noise', iteration 0); ``callback(k, num_steps)`` after each step.
    """
    x = initial_noise(context, latent_shape, indices, seed=seed, stream=stream, noise=noise)
    sig = shifted_sigmas(num_steps, shift).tolist()
    for k in range(num_steps):
        v = guided_velocity(net, x, sig[k], context, uncond_context, guidance_scale, cond)
        x = x + (sig[k + 1] - sig[k]) * v
        if callback is not None:
            callback(k + 1, num_steps)
    return x if cond is None else cond.with_given(x)
