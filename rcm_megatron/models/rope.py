"""3D rotary position embedding of Wan (frames, height, width axes of the patch grid).

The head dimension is split into (t, h, w) parts, h = w = 2 (head_dim // 6); each part
rotates interleaved channel pairs by its axis position. It is linear in x for fixed
positions, so the tangent uses the same rotation.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def _axis_angles(dim: int, max_len: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)  # [max_len, dim/2]


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, max_len: int = 1024, theta: float = 10000.0,
                 device=None, dtype=torch.float32, token_range: tuple[int, int] | None = None):
    """cos and sin tables [S, head_dim/2] for the flattened (f, h, w) token order.

    Angles are made in float64 and cast to ``dtype`` (fp32 for the model, fp64 for the
    oracle), exactly as diffusers does. ``token_range`` selects a slice of the flattened
    sequence (context parallelism); positions past the grid (padding) get angle 0.
    """
    f, h, w = grid
    if max(grid) > max_len:
        raise ValueError(f"latent grid {grid} exceeds the RoPE table length {max_len}")
    dt, dh, dw = axis_dims(head_dim)
    ang = [_axis_angles(d, max_len, theta) for d in (dt, dh, dw)]
    n = f * h * w
    start, stop = token_range if token_range is not None else (0, n)
    idx = torch.arange(start, stop)
    valid = idx < n
    idx = idx.clamp(max=n - 1)
    fi, hi, wi = idx // (h * w), (idx // w) % h, idx % w
    angles = torch.cat([ang[0][fi], ang[1][hi], ang[2][wi]], dim=-1)
    angles = angles * valid.unsqueeze(-1)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by the tables [S, D/2]; computed in fp32."""
    xf = x.to(torch.promote_types(x.dtype, cos.dtype))
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)
