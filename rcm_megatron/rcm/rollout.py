"""Student rollout from pure noise (docs/design.md §2.4).

Each sample i runs N_i steps at times times[i, 0] > times[i, 1] > ... : x0 = student
x0_hat(x, t_k), then re-noise x = cos t_{k+1} x0 + sin t_{k+1} eps_k. The whole rollout is
forward-only; what it keeps is each sample's *last step input* (x, t), so the last step
can be recomputed with grad (``predict(net, last_x, last_t, context)``). That costs one
extra forward, keeps every with-grad pass the same shape, and is how a pipeline-parallel
schedule runs it.

Steps may differ per sample: step k runs only the samples with N_i > k. Noise is keyed
per sample (rng.py), so results do not depend on how the batch is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .conditioning import Conditioning, resolve
from .protocol import VelocityNet
from .rng import Indices, KeyedRNG, index_list
from .time_samplers import TimeSampler
from .trigflow import add_noise, predict


@dataclass
class RolloutResult:
    """x0: rollout output G [B,...] (float64, no grad); last_x / last_t: input of each
    sample's final step; num_steps [B]."""

    x0: Tensor
    last_x: Tensor
    last_t: Tensor
    num_steps: Tensor


def training_schedule(
    rng: KeyedRNG, stream: str, indices: Indices, p_d: TimeSampler, max_steps: int,
    random_steps: bool = True, fixed_times: tuple[float, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample rollout times [B, max_steps] (column 0 = pi/2) and step counts [B].

    N_i ~ U{1..max_steps} (or max_steps). Intermediate times are ``fixed_times[:N_i-1]``
    or N_i - 1 iid draws from p_d sorted non-increasing. Unused columns are 0.
    """
    b = len(indices)
    if random_steps:
        num_steps = rng.randint(f"{stream}.steps", indices, 1, max_steps + 1)
    else:
        num_steps = torch.full((b,), max_steps, dtype=torch.int64)
    times = torch.zeros(b, max_steps, dtype=torch.float64)
    times[:, 0] = math.pi / 2
    if max_steps > 1:
        used = torch.arange(max_steps - 1) < (num_steps[:, None] - 1)
        if fixed_times is not None:
            mid = torch.tensor(fixed_times[: max_steps - 1], dtype=torch.float64).expand(b, -1)
        else:
            draws = p_d.sample(rng, f"{stream}.times", indices, (max_steps - 1,))
            mid = torch.where(used, draws, -math.inf).sort(dim=1, descending=True).values
        times[:, 1:] = torch.where(used, mid, 0.0)
    return times, num_steps


@torch.no_grad()
def rollout(
    net: VelocityNet, shape: tuple[int, ...], times: Tensor, num_steps: Tensor, context: Tensor,
    rng: KeyedRNG, stream: str, indices: Indices, cond: Conditioning | None = None,
) -> RolloutResult:
    """Run the few-step student chain without grad from x = eps, eps ~ N(0, I) of per-sample
    ``shape`` (stream f'{stream}.noise'); re-noising eps_k uses f'{stream}.renoise.{k}'.
    ``cond`` (image conditioning) goes to every step; with given frames, x0 holds them."""
    cond = resolve(cond)
    idx = torch.tensor(index_list(indices), dtype=torch.int64)
    device = context.device
    times = times.to(device=device, dtype=torch.float64)
    num_steps = num_steps.to(device)
    x = rng.normal(f"{stream}.noise", idx, shape, device=device)
    x0 = torch.zeros_like(x)
    last_x = torch.zeros_like(x)
    last_t = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
    for k in range(int(num_steps.max())):
        active = (num_steps > k).nonzero().flatten()
        x0[active] = predict(net, x[active], times[active, k], context[active], cond.select(active)).x0
        done = active[num_steps[active] == k + 1]
        last_x[done], last_t[done] = x[done], times[done, k]
        going = active[num_steps[active] > k + 1]
        if len(going):
            eps = rng.normal(f"{stream}.renoise.{k}", idx[going.cpu()], x.shape[1:], device=device)
            x[going] = add_noise(x0[going], eps, times[going, k + 1])
    return RolloutResult(x0=x0, last_x=last_x, last_t=last_t, num_steps=num_steps)

