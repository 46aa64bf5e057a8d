"""Flow-matching pretraining of a teacher (``pretrain_rcm.py --mode teacher``).

Rectified flow as Wan is trained: x_s = (1 - s) x0 + s eps, the network predicts
v = eps - x0 at timestep 1000 s, s from Wan's shifted uniform sampler. The prompt is
replaced by the negative-prompt embedding with probability ``cond_drop`` so the teacher
supports classifier-free guidance. Draws are keyed per sample (layout-invariant).

Image-to-video (``cond``, ``rcm/conditioning.py``): the image is kept on both sides of the text
drop (as the method's CFG keeps it); condition channels follow the noisy latents; a given first
frame (TI2V) enters clean at timestep 0 and is left out of the loss.
"""

from __future__ import annotations

import torch

from ..rcm.conditioning import Conditioning, resolve
from ..rcm.rng import KeyedRNG
from ..rcm.trigflow import wan_time_shift


def flow_matching_loss(net, x0, context, uncond_context, indices, seed: int, iteration: int,
                       shift: float = 3.0, cond_drop: float = 0.1, cond: Conditioning | None = None):
    """Per-sample sum of squared velocity errors (fp32); returns (loss_sum, per_sample)."""
    rng = KeyedRNG(seed, iteration)
    dev, dt = x0.device, x0.dtype
    eps = rng.normal("fm.noise", indices, x0.shape[1:], device=dev).to(dt)
    u = rng.uniform("fm.time", indices, device=dev)
    s = wan_time_shift(u, shift).clamp(1e-4, 1 - 1e-4)
    drop = rng.uniform("fm.drop", indices, device=dev) < cond_drop
    ctx = torch.where(drop.view(-1, 1, 1), uncond_context.to(context.dtype).expand_as(context), context)
    sb = s.view(-1, 1, 1, 1, 1).to(dt)
    x_s = (1 - sb) * x0 + sb * eps
    timestep = (1000.0 * s).to(torch.float32 if dt != torch.float64 else dt)
    cond = resolve(cond)  # text-to-video: every step below is the identity
    v = net(cond.network_input(cond.with_given(x_s)), cond.token_timestep(timestep, x0.shape), ctx,
            **cond.net_kwargs())
    per_sample = cond.exclude((v.float() - (eps - x0).float()).square()).flatten(1).sum(1)
    return per_sample.sum(), per_sample
