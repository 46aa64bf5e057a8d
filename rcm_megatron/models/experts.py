"""Wan2.2 A14B: two experts of one architecture, chosen by the timestep.

diffusers' ``WanImageToVideoPipeline`` / ``WanPipeline`` with ``transformer_2`` run
``transformer`` (the high-noise expert) at timesteps t >= boundary_ratio * 1000 and
``transformer_2`` (the low-noise expert) below. ``WanExperts`` makes that choice per sample,
so a batch may mix the two; each sample's output is its expert's output, with tangent.
Released boundaries: I2V A14B 0.900, T2V A14B 0.875 (``model_index.json``'s ``boundary_ratio``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import WanConfig
from .wan import WanDiT

NUM_TRAIN_TIMESTEPS = 1000
BOUNDARY_RATIOS = {"i2v-a14b": 0.9, "t2v-a14b": 0.875}


class WanExperts(nn.Module):
    """``high_noise`` (diffusers' ``transformer``) and ``low_noise`` (``transformer_2``)."""

    def __init__(self, high_noise: WanDiT, low_noise: WanDiT, boundary_ratio: float):
        super().__init__()
        if high_noise.config != low_noise.config:
            raise ValueError(f"the two experts must share one architecture, got {high_noise.config} "
                             f"and {low_noise.config}")
        if not 0.0 < float(boundary_ratio) < 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
        self.high_noise, self.low_noise = high_noise, low_noise
        self.boundary_ratio = float(boundary_ratio)

    @classmethod
    def build(cls, config: WanConfig, boundary_ratio: float, seed: int = 0) -> "WanExperts":
        """Two randomly initialized experts (seeds ``seed`` and ``seed + 1``)."""
        high, low = WanDiT(config), WanDiT(config)
        high.reset_parameters(seed)
        low.reset_parameters(seed + 1)
        return cls(high, low, boundary_ratio)

    @property
    def config(self) -> WanConfig:
        return self.high_noise.config

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def uses_high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """[B] bool: which samples the high-noise expert handles (t >= boundary, as diffusers)."""
        if timestep.dim() != 1:
            raise ValueError(f"the experts are chosen per sample: timestep must be [B], got {tuple(timestep.shape)}")
        return timestep >= self.boundary_timestep

    def _route(self, call, latents, timestep, *per_sample):
        """Run each expert on its samples; outputs (tuples of tensors) back in batch order."""
        high = self.uses_high_noise(timestep)
        if bool(high.all()) or not bool(high.any()):
            return call(self.high_noise if bool(high.all()) else self.low_noise, latents, timestep, *per_sample)
        idx = [high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)]
        parts = [call(expert, latents[i], timestep[i], *(None if a is None else a[i] for a in per_sample))
                 for expert, i in zip((self.high_noise, self.low_noise), idx)]
        inverse = torch.argsort(torch.cat(idx))
        return tuple(None if a is None else torch.cat([a, b])[inverse] for a, b in zip(*parts))

    def forward(self, latents, timestep, context, image_context=None):
        return self._route(lambda m, x, t, c, i: (m(x, t, c, i),), latents, timestep, context, image_context)[0]

    @torch.no_grad()
    def forward_with_tangent(self, latents, timestep, context, latents_tan, timestep_tan, image_context=None):
        if timestep_tan is None:
            timestep_tan = torch.zeros_like(timestep)
        return self._route(lambda m, x, t, c, x_tan, t_tan, i: m.forward_with_tangent(x, t, c, x_tan, t_tan, i),
                           latents, timestep, context, latents_tan, timestep_tan, image_context)
