"""A tiny smooth VelocityNet for tests and smoke runs (not a model of anything).

Conv over H,W -> adaLN-style time modulation -> context shift -> tanh -> 1x1 conv, plus a
skip. Every piece is smooth, and the time embedding uses low frequencies of timestep/1000,
so finite differences in float64 are accurate. ``forward_with_tangent`` is torch.func.jvp.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ToyVelocityNet(nn.Module):
    def __init__(self, channels: int = 4, context_dim: int = 8, hidden: int = 16, time_freqs: int = 4,
                 dtype: torch.dtype = torch.float64, seed: int | None = None):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.conv_in = nn.Conv3d(channels, hidden, (1, 3, 3), padding=(0, 1, 1))
        self.time = nn.Linear(2 * time_freqs, 2 * hidden)
        self.ctx = nn.Linear(context_dim, hidden)
        self.conv_out = nn.Conv3d(hidden, channels, 1)
        self.register_buffer("freqs", 0.5 * 2.0 ** torch.arange(time_freqs, dtype=torch.float64), persistent=False)
        self.to(dtype)

    def forward(self, latents: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        arg = (timestep / 1000.0)[:, None] * self.freqs.to(timestep.dtype)
        emb = torch.cat([arg.sin(), arg.cos()], dim=-1).to(latents.dtype)
        scale, shift = self.time(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.conv_in(latents) * (1 + scale) + shift + self.ctx(context.mean(dim=1))[:, :, None, None, None]
        return self.conv_out(torch.tanh(h)) - 0.5 * latents

    @torch.no_grad()
    def forward_with_tangent(self, latents, timestep, context, t_latents, t_timestep):
        return torch.func.jvp(lambda x, ts: self(x, ts, context), (latents, timestep), (t_latents, t_timestep))
