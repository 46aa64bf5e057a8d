"""Toy image-to-video task: the toy video task (toy.py) with its first latent frame given.

The samples, classes and prompts are those of ``ToyVideoLatents``; each batch also carries
``first_frame`` [B, C, 1, H, W], the clean first latent frame. Given the first frame, the rest
of the video is fixed up to the motion direction (the mode): position, amplitude and class
detail are visible in frame 0, so the model must continue the pattern.

``conditioning`` builds the method's ``Conditioning`` in either layout of the real models:
- "ti2v" (Wan2.2 TI2V): the first frame is given at time 0 (``Conditioning.given``); every
  sample keeps it exactly, by construction.
- "concat" (Wan2.1 / Wan2.2 I2V): ``mask_channels`` mask channels (1 on the first frame) and the
  first frame followed by zeros, concatenated after the noisy latents (the network's
  in_channels = C + mask_channels + C); keeping the first frame is learned, and
  ``first_frame_error`` measures it.

A model with ``image_dim`` (Wan2.1 I2V's CLIP branch) gets ``image_tokens``: the first frame's
2x2 latent patches as tokens ([B, H*W/4, 4 C]; the toy's stand-in for CLIP image embeddings,
``IMAGE_DIM`` = 16 wide), so the image branch has something that identifies the frame.
"""

from __future__ import annotations

import torch

from ..rcm.conditioning import Conditioning
from .toy import ToyVideoLatents

LAYOUTS = ("ti2v", "concat")
IMAGE_PATCH = 2
IMAGE_DIM = 4 * IMAGE_PATCH * IMAGE_PATCH  # toy latent channels x patch area


class ToyI2VLatents(ToyVideoLatents):
    """``ToyVideoLatents`` whose items and batches also hold ``first_frame``."""

    conditions = ("first_frame", "image_embeds")
    image_dim = IMAGE_DIM

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        first = item["latents"][:, :1].clone()
        return item | {"first_frame": first, "image_embeds": image_tokens(first[None])[0]}

    def batch(self, indices) -> dict:
        out = super().batch(indices)
        first = out["latents"][:, :, :1].clone()
        return out | {"first_frame": first, "image_embeds": image_tokens(first)}


def conditioning(first_frame: torch.Tensor, latent_shape, layout: str = "ti2v", mask_channels: int = 1,
                 patch_size=(1, 2, 2)) -> Conditioning:
    """The method's conditioning for given first frames [B, C, 1, H, W] of latents [C, T, H, W]."""
    if layout not in LAYOUTS:
        raise ValueError(f"toy I2V layout must be one of {LAYOUTS}, got {layout!r}")
    c, t, h, w = latent_shape
    if first_frame.dim() != 5 or tuple(first_frame.shape[1:]) != (c, 1, h, w):
        raise ValueError(f"first_frame: expected [B,{c},1,{h},{w}], got {tuple(first_frame.shape)}")
    if layout == "ti2v":
        return Conditioning(given=first_frame, patch_size=patch_size)
    b = first_frame.shape[0]
    mask = torch.zeros(b, mask_channels, t, h, w, dtype=first_frame.dtype, device=first_frame.device)
    mask[:, :, 0] = 1
    rest = torch.zeros(b, c, t - 1, h, w, dtype=first_frame.dtype, device=first_frame.device)
    return Conditioning(concat=torch.cat([mask, torch.cat([first_frame, rest], dim=2)], dim=1), patch_size=patch_size)


def first_frame_error(latents: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    """[B] RMS difference between the generated first latent frame and the given one, relative to
    the given frame's RMS (0 = kept exactly)."""
    diff = (latents[:, :, :1].double() - first_frame.double()).flatten(1)
    return diff.square().mean(1).sqrt() / first_frame.double().flatten(1).square().mean(1).sqrt()


def image_tokens(first_frame: torch.Tensor, patch: int = IMAGE_PATCH) -> torch.Tensor:
    """[B, C, 1, H, W] -> [B, (H/p)(W/p), C p^2]: the first frame's latent patches as image tokens."""
    b, c, _, h, w = first_frame.shape
    x = first_frame[:, :, 0].reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)
