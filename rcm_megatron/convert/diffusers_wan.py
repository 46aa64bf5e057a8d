"""diffusers ``WanTransformer3DModel`` <-> our ``WanDiT``: a declarative name map.

Parameter names are identical except for the few renames listed in ``NAME_MAP``; shapes are
identical (our model stores full tensors at TP = 1; sharding is applied after loading).
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..models.config import WanConfig
from ..models.wan import WanDiT

# (diffusers regex, our replacement); applied in order, first match wins.
NAME_MAP: list[tuple[str, str]] = [
    (r"^patch_embedding\.(weight|bias)$", r"patch_embedding.proj.\1"),
    (r"^condition_embedder\.time_embedder\.(linear_[12])\.", r"time_embedding.\1."),
    (r"^condition_embedder\.time_proj\.", r"time_embedding.time_proj."),
    (r"^condition_embedder\.text_embedder\.(linear_[12])\.", r"text_embedding.\1."),
    (r"^blocks\.(\d+)\.(attn[12])\.to_out\.0\.", r"blocks.\1.\2.to_out."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.fc1."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.fc2."),
    (r"^(blocks\.\d+\.(attn[12]\.(to_[qkv]|norm_[qk])|norm2)\.(weight|bias))$", r"\1"),
    (r"^(blocks\.\d+\.scale_shift_table|scale_shift_table|proj_out\.(weight|bias))$", r"\1"),
]
REVERSE_MAP: list[tuple[str, str]] = [
    (r"^patch_embedding\.proj\.", "patch_embedding."),
    (r"^time_embedding\.(linear_[12])\.", r"condition_embedder.time_embedder.\1."),
    (r"^time_embedding\.time_proj\.", "condition_embedder.time_proj."),
    (r"^text_embedding\.(linear_[12])\.", r"condition_embedder.text_embedder.\1."),
    (r"^blocks\.(\d+)\.(attn[12])\.to_out\.", r"blocks.\1.\2.to_out.0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"blocks.\1.ffn.net.2."),
    (r"^(.*)$", r"\1"),
]


def _map_name(name: str, rules) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def config_from_diffusers(cfg: dict) -> WanConfig:
    """WanConfig from a diffusers config.json dict; rejects variants we do not model (I2V, no qk-norm)."""
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        raise ValueError("image-conditioned Wan (image_dim / added_kv_proj_dim set) is not supported; "
                         "expected a text-to-video WanTransformer3DModel config")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"qk_norm={cfg.get('qk_norm')!r} is not supported; expected 'rms_norm_across_heads'")
    heads, head_dim = int(cfg.get("num_attention_heads", 40)), int(cfg.get("attention_head_dim", 128))
    return WanConfig(
        num_layers=int(cfg.get("num_layers", 40)),
        hidden_size=heads * head_dim,
        ffn_hidden_size=int(cfg.get("ffn_dim", 13824)),
        num_attention_heads=heads,
        in_channels=int(cfg.get("in_channels", 16)),
        out_channels=int(cfg.get("out_channels") or cfg.get("in_channels", 16)),
        text_dim=int(cfg.get("text_dim", 4096)),
        freq_dim=int(cfg.get("freq_dim", 256)),
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        eps=float(cfg.get("eps", 1e-6)),
        rope_max_seq_len=int(cfg.get("rope_max_seq_len", 1024)),
        cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
    )


def diffusers_config(cfg: WanConfig) -> dict:
    """The diffusers config.json content for our config."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_hidden_size,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


def diffusers_to_ours(state_dict: dict, expected: set[str] | None = None) -> dict:
    """Rename a diffusers state dict; unknown or missing names raise one error listing them all."""
    out, unknown = {}, []
    for name, tensor in state_dict.items():
        if name.endswith("norm_added_q.weight"):  # diffusers ignores it on load too
            continue
        ours = _map_name(name, NAME_MAP)
        if ours is None:
            unknown.append(name)
        else:
            out[ours] = tensor
    missing = sorted(expected - set(out)) if expected is not None else []
    if unknown or missing:
        raise KeyError(f"diffusers Wan state dict does not match the architecture: "
                       f"unexpected keys {sorted(unknown)}; missing keys {missing}")
    return out


def ours_to_diffusers(state_dict: dict) -> dict:
    return {_map_name(k, REVERSE_MAP): v for k, v in state_dict.items()}


def load_diffusers_wan(model_or_path, dtype: torch.dtype | None = None) -> WanDiT:
    """Our single-process WanDiT holding the weights of a diffusers WanTransformer3DModel.

    ``model_or_path`` is a model instance or a folder with config.json and safetensors
    weights (single file or sharded with an index). No hub access: local only.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        cfg_dict, sd = _read_folder(os.fspath(model_or_path))
    else:
        cfg_dict, sd = dict(model_or_path.config), model_or_path.state_dict()
    cfg = config_from_diffusers(cfg_dict)
    model = WanDiT(cfg)
    ours = diffusers_to_ours(sd, expected=set(model.state_dict()))
    for k, v in ours.items():
        want = model.state_dict()[k].shape
        if tuple(v.shape) != tuple(want):
            raise ValueError(f"diffusers tensor for {k} has shape {tuple(v.shape)}, expected {tuple(want)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in ours.items()})
    if dtype is not None:
        model = model.to(dtype) if dtype in (torch.float32, torch.float64) else model.to_dtype(dtype)
    return model


def _read_folder(path: str):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not a diffusers model folder: no config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    from safetensors.torch import load_file

    index = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
    single = os.path.join(path, "diffusion_pytorch_model.safetensors")
    sd = {}
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        for fn in files:
            sd.update(load_file(os.path.join(path, fn)))
    elif os.path.isfile(single):
        sd = load_file(single)
    else:
        raise FileNotFoundError(f"{path}: no diffusion_pytorch_model.safetensors(.index.json)")
    return cfg, sd
