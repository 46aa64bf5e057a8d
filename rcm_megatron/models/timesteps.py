"""Per-token timesteps of Wan2.2 TI2V (diffusers' ``expand_timesteps``).

TI2V conditions on an image by giving its latent frame(s) as they are: those tokens sit at
timestep 0 while the rest of the video is at the sample's timestep. The map is linear in the
timestep, so the same call turns a time tangent [B] into the per-token tangent, which is 0 on
the given tokens (they are not generated and carry no time tangent).
"""

from __future__ import annotations

import torch


def token_grid(latent_shape, patch_size) -> tuple[int, int, int]:
    """(frames, height, width) in tokens of latents [..., T, H, W] under the patch size."""
    t, h, w = latent_shape[-3:]
    pt, ph, pw = patch_size
    return t // pt, h // ph, w // pw


def given_frames_mask(grid, given_frames: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """[S] in the flattened (f, h, w) token order: 0 on the first ``given_frames`` token frames, 1 elsewhere."""
    f, h, w = grid
    if not 0 <= given_frames <= f:
        raise ValueError(f"given_frames must be in 0..{f} (token frames), got {given_frames}")
    mask = torch.ones(f, h * w, device=device, dtype=dtype)
    mask[:given_frames] = 0
    return mask.flatten()


def expand_timesteps(timestep: torch.Tensor, grid, given_frames: int = 1) -> torch.Tensor:
    """timestep [B] -> [B, S]: 0 on the given first frame(s), the sample's timestep elsewhere
    (diffusers' ``WanImageToVideoPipeline`` with ``expand_timesteps=True``: mask * t)."""
    if timestep.dim() != 1:
        raise ValueError(f"timestep must be [B], got shape {tuple(timestep.shape)}")
    mask = given_frames_mask(grid, given_frames, timestep.device, timestep.dtype)
    return timestep[:, None] * mask[None]
