"""The network interface the method is written against.

Teacher, student and fake score are all rectified-flow "velocity networks". The method
package never looks inside them, so the parallel DiT, a toy network and a mock all fit.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class VelocityNet(Protocol):
    """v = net(latents [B,C,T,H,W], timestep [B] on the RF 0..1000 scale, context [B,L,D])."""

    def __call__(self, latents: Tensor, timestep: Tensor, context: Tensor) -> Tensor: ...

    def forward_with_tangent(
        self, latents: Tensor, timestep: Tensor, context: Tensor, latents_tan: Tensor, timestep_tan: Tensor
    ) -> tuple[Tensor, Tensor]:
        """No-grad (v, v_tan) with v_tan the derivative of v along (latents_tan, timestep_tan)."""
        ...


def net_dtype(net) -> torch.dtype:
    """The dtype latents are cast to before entering ``net``.

    A ``dtype`` attribute wins (lets sharded / compiled wrappers declare it); otherwise the
    first floating parameter's dtype; float32 for parameter-free callables.
    """
    dtype = getattr(net, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    params = getattr(net, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def timestep_dtype(dtype: torch.dtype) -> torch.dtype:
    """Timesteps are never narrower than fp32: bf16 resolves only ~4 units near 1000."""
    return torch.promote_types(dtype, torch.float32)
