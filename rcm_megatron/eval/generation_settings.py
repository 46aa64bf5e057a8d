"""What tools/generate.py samples with when a flag is not given: the settings the checkpoint's
training run recorded, and a memory estimate checked before anything is allocated.

A training checkpoint records the method settings (``rcm_config``: guidance ``cfg_scale``, the
sampler's ``sample_mid_times`` / ``sample_sigma_max``) and the architecture; the data's latent
shape and text length are recorded under ``data`` when the trainer writes them, and are
otherwise recognised for the built-in toy task (its 4-channel, text_dim-32 model). Wan's video
defaults (81 x 480 x 832, 512 text tokens, guidance 5) apply only to models without a record.
"""

from __future__ import annotations

import math

from ..data import toy

WAN_TEXT_LEN, WAN_GUIDANCE = 512, 5.0


def is_toy_model(cfg) -> bool:
    """The built-in toy task's model shape (latent channels and text width are the task's)."""
    return cfg.out_channels == toy.LATENT_SHAPE[0] and cfg.text_dim == toy.TEXT_DIM


def recorded_settings(meta: dict | None, cfg) -> dict:
    """{"latent_shape", "text_len", "guidance_scale", "mid_times", "sigma_max", "toy"} from a training
    checkpoint's metadata; a key is absent where the checkpoint records nothing for it."""
    meta = meta or {}
    rcm = meta.get("rcm_config") or {}
    data = meta.get("data") or {}
    toy_task = data.get("source") in ("toy", "toy-i2v") or (not data and is_toy_model(cfg))
    out = {"toy": toy_task}
    if data.get("latent_shape"):
        out["latent_shape"] = tuple(int(s) for s in data["latent_shape"])
    elif toy_task:
        out["latent_shape"] = toy.LATENT_SHAPE
    if data.get("text_len"):
        out["text_len"] = int(data["text_len"])
    elif toy_task:
        out["text_len"] = toy.TEXT_LEN
    if rcm.get("cfg_scale") is not None:
        out["guidance_scale"] = float(rcm["cfg_scale"])
    if rcm.get("sample_mid_times"):
        out["mid_times"] = tuple(float(t) for t in rcm["sample_mid_times"])
    if rcm.get("sample_sigma_max") is not None:
        out["sigma_max"] = float(rcm["sample_sigma_max"])
    return out


def toy_contexts() -> tuple[list[str], "torch.Tensor", "torch.Tensor"]:  # noqa: F821
    """The toy task's prompts: one class embedding per class (no text encoder), and its unconditional one."""
    prompts, uncond = toy.class_embeddings()
    return [f"toy class {c}" for c in range(prompts.shape[0])], prompts, uncond.unsqueeze(0)


def sampling_bytes(cfg, shape, batch_size: int, weight_bytes: int, device_type: str) -> int:
    """Bytes that sampling a batch needs at least: the weights, the activations of one block
    (qkv, attention output and FFN of every token, twice for in/out) and, on CPU, where SDPA may use
    the math kernel, one layer's attention scores and their softmax (2 x heads x tokens^2; the toy
    model at Wan's 81 x 480 x 832 was killed at 24 GB RSS)."""
    tokens = math.prod(s // p for s, p in zip(shape[1:], cfg.patch_size))
    act = batch_size * tokens * (4 * cfg.hidden_size + cfg.ffn_hidden_size) * 4 * 2
    scores = 2 * batch_size * cfg.num_attention_heads * tokens * tokens * 4 if device_type == "cpu" else 0
    return int(weight_bytes + act + scores)


def available_bytes(device) -> int:
    """Free memory where sampling allocates: CUDA free memory, else psutil's available host memory."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(cfg, shape, batch_size: int, weight_bytes: int, device) -> None:
    """ValueError naming the shape and both sizes when sampling would not fit."""
    need, have = sampling_bytes(cfg, shape, batch_size, weight_bytes, device.type), available_bytes(device)
    if need > have:
        raise ValueError(f"latents {list(shape)} x batch {batch_size} need about {need / 2**30:.1f} GiB on {device}, "
                         f"{have / 2**30:.1f} GiB is available: choose a smaller --latent-shape / --num-frames / "
                         "--height / --width or --batch-size")
