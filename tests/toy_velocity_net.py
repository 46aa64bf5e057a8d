"""A tiny smooth VelocityNet for the method tests (not a model of anything).

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
    def forward_with_tangent(self, latents, timestep, context, latents_tan, timestep_tan):
        return torch.func.jvp(lambda x, ts: self(x, ts, context), (latents, timestep), (latents_tan, timestep_tan))


def toy_batch(batch: int = 4, channels: int = 4, frames: int = 2, height: int = 4, width: int = 4,
              context_len: int = 5, context_dim: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0,
              first_index: int = 0):
    """(x0, context, uncond_context [1,L,D], indices) for the toy net; samples depend only on
    their global index, so any slice of a bigger toy batch is itself a toy batch."""
    idx = torch.arange(first_index, first_index + batch)
    rows = []
    for i in idx.tolist():
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        rows.append((torch.randn(channels, frames, height, width, generator=g, dtype=dtype),
                     torch.randn(context_len, context_dim, generator=g, dtype=dtype)))
    x0 = torch.stack([r[0] for r in rows])
    context = torch.stack([r[1] for r in rows])
    uncond = torch.randn(1, context_len, context_dim, generator=torch.Generator().manual_seed(2**40 + seed), dtype=dtype)
    return x0, context, uncond, idx
