"""Image conditioning of a training batch: from the data's fields to the ``Conditioning`` of
the method (``rcm/conditioning.py``), in the layout the model takes.

Image-to-video data carry, per sample, any of
- ``first_frame`` [C, 1, H, W]: the clean first latent frame (the given frame of Wan2.2 TI2V);
- ``condition`` [4 + C, T, H, W]: Wan's condition channels, mask then condition latents, as
  diffusers' ``WanImageToVideoPipeline.prepare_latents`` builds them (mask 1 on the first latent
  frame, the VAE latents of [first frame, zero frames]);
- ``image_embeds`` [L_img, image_dim]: CLIP image embeddings (Wan2.1 I2V's image branch).
A dataset lists the fields it has in ``conditions`` (empty for text-to-video) and, with
``image_embeds``, their width in ``image_dim``.

The model says which it takes: ``in_channels - out_channels`` condition channels are
concatenated after the noisy latents (Wan2.1 / Wan2.2 I2V: 20 = mask 4 + latents 16); with
none, a first frame is given in place at time 0 (Wan2.2 TI2V); ``image_dim`` asks for image
embeddings. ``check`` names what does not fit before any model is built.
"""

from __future__ import annotations

import torch

from ..models.config import WanConfig
from ..rcm.conditioning import Conditioning
from . import toy_i2v

FIELDS = ("first_frame", "condition", "image_embeds")


def condition_channels(cfg: WanConfig) -> int:
    """Channels concatenated after the noisy latents (0: none, T2V or TI2V)."""
    return cfg.in_channels - cfg.out_channels


def is_image_model(cfg: WanConfig) -> bool:
    """Whether the model cannot run without an image (condition channels or an image branch)."""
    return condition_channels(cfg) > 0 or cfg.image_dim is not None


def describe(cfg: WanConfig) -> str:
    extra = condition_channels(cfg)
    parts = [f"in_channels {cfg.in_channels} = {cfg.out_channels} noisy + {extra} condition"] if extra > 0 else []
    if cfg.image_dim is not None:
        parts.append(f"image_dim {cfg.image_dim} (image embeddings)")
    return "the model takes an image (" + ", ".join(parts) + ")" if parts else "a text-to-video model"


def check(conditions, latent_channels: int, cfg: WanConfig, source: str, *, condition_width: int | None = None,
          image_dim: int | None = None) -> str | None:
    """Why data with fields ``conditions`` cannot train the model, or None."""
    conditions = tuple(conditions or ())
    extra = condition_channels(cfg)
    need = "use --data toy-i2v or shards of tools/prepare_data.py --task i2v"
    if extra < 0:
        return f"the model has in_channels {cfg.in_channels} < out_channels {cfg.out_channels}"
    if extra > 0:
        if "condition" in conditions:
            if condition_width is not None and condition_width != extra:
                return (f"{source}: condition has {condition_width} channels, {describe(cfg)}")
        elif "first_frame" in conditions:
            if extra - latent_channels < 1:
                return (f"{source}: {describe(cfg)}: {extra} condition channels leave no mask channel next to "
                        f"the {latent_channels} first-frame latent channels")
        else:
            return f"{source} has no first frame or condition latents; {describe(cfg)}: {need}"
    if cfg.image_dim is not None:
        if "image_embeds" not in conditions:
            return f"{source} has no image embeddings; {describe(cfg)}: {need} --image-encoder"
        if image_dim is not None and image_dim != cfg.image_dim:
            return f"{source}: image embeddings are {image_dim} wide, the model expects image_dim={cfg.image_dim}"
    return None


def batch_conditioning(raw: dict, cfg: WanConfig, device=None) -> Conditioning | None:
    """The ``Conditioning`` of a raw batch (fields stacked over the batch) for the model ``cfg``;
    None for text-to-video."""
    move = lambda x: None if x is None else x.to(device=device, dtype=torch.float32)  # noqa: E731
    image = move(raw.get("image_embeds")) if cfg.image_dim is not None else None
    extra = condition_channels(cfg)
    if extra > 0:
        concat = raw.get("condition")
        if concat is None:
            first = raw["first_frame"]
            shape = (first.shape[1], raw["latents"].shape[2], *first.shape[3:])
            concat = toy_i2v.conditioning(first, shape, "concat", mask_channels=extra - first.shape[1],
                                          patch_size=cfg.patch_size).concat
        return Conditioning(image_context=image, concat=move(concat), patch_size=cfg.patch_size)
    if raw.get("first_frame") is not None:
        return Conditioning(image_context=image, given=move(raw["first_frame"]), patch_size=cfg.patch_size)
    return None if image is None else Conditioning(image_context=image, patch_size=cfg.patch_size)
