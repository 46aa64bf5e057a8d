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

# Placeholders of the name templates below and what each matches.
NAME_FIELDS = {"i": r"\d+", "p": r"weight|bias", "n": r"[12]", "attn": r"attn[12]", "qkv": r"[qkv]", "qk": r"[qk]",
               "kv": r"[kv]"}

# (diffusers name, our name) templates; a placeholder stands for the same text on both sides.
# Both directions are compiled from this one table (``NAME_MAP``, ``REVERSE_MAP``).
NAME_TEMPLATES: list[tuple[str, str]] = [
    ("patch_embedding.{p}", "patch_embedding.proj.{p}"),
    ("condition_embedder.time_embedder.linear_{n}.{p}", "time_embedding.linear_{n}.{p}"),
    ("condition_embedder.time_proj.{p}", "time_embedding.time_proj.{p}"),
    ("condition_embedder.text_embedder.linear_{n}.{p}", "text_embedding.linear_{n}.{p}"),
    ("condition_embedder.image_embedder.norm{n}.{p}", "image_embedding.norm{n}.{p}"),
    ("condition_embedder.image_embedder.ff.net.0.proj.{p}", "image_embedding.fc1.{p}"),
    ("condition_embedder.image_embedder.ff.net.2.{p}", "image_embedding.fc2.{p}"),
    ("blocks.{i}.{attn}.to_out.0.{p}", "blocks.{i}.{attn}.to_out.{p}"),
    ("blocks.{i}.ffn.net.0.proj.{p}", "blocks.{i}.ffn.fc1.{p}"),
    ("blocks.{i}.ffn.net.2.{p}", "blocks.{i}.ffn.fc2.{p}"),
    ("blocks.{i}.{attn}.to_{qkv}.{p}", "blocks.{i}.{attn}.to_{qkv}.{p}"),
    ("blocks.{i}.{attn}.norm_{qk}.weight", "blocks.{i}.{attn}.norm_{qk}.weight"),
    ("blocks.{i}.attn2.add_{kv}_proj.{p}", "blocks.{i}.attn2.add_{kv}_proj.{p}"),
    ("blocks.{i}.attn2.norm_added_k.weight", "blocks.{i}.attn2.norm_added_k.weight"),
    ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.scale_shift_table", "blocks.{i}.scale_shift_table"),
    ("scale_shift_table", "scale_shift_table"),
    ("proj_out.{p}", "proj_out.{p}"),
]


def compile_name_rules(templates, fields=NAME_FIELDS, reverse: bool = False) -> list[tuple[str, str]]:
    """(source template, target template) pairs -> anchored (regex, replacement) rules, first match
    wins; ``reverse`` maps target -> source. Every placeholder ``{x}`` becomes the group ``x``."""
    def regex(template):
        parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
        return "^" + "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{fields[p]})"
                             for k, p in enumerate(parts)) + "$"

    def replacement(template):
        return re.sub(r"\{(\w+)\}", r"\\g<\1>", template)

    pairs = [(b, a) for a, b in templates] if reverse else templates
    return [(regex(src), replacement(dst)) for src, dst in pairs]


NAME_MAP: list[tuple[str, str]] = compile_name_rules(NAME_TEMPLATES)  # diffusers -> ours
REVERSE_MAP: list[tuple[str, str]] = compile_name_rules(NAME_TEMPLATES, reverse=True)  # ours -> diffusers


def _map_name(name: str, rules) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def config_from_diffusers(cfg: dict) -> WanConfig:
    """WanConfig from a diffusers config.json dict; rejects variants we do not model (no qk-norm,
    FLF2V's image position embedding, image K/V projections of another width than the model's)."""
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"qk_norm={cfg.get('qk_norm')!r} is not supported; expected 'rms_norm_across_heads'")
    if cfg.get("pos_embed_seq_len") is not None:
        raise ValueError(f"pos_embed_seq_len={cfg['pos_embed_seq_len']} (Wan FLF2V, first-last-frame) is not "
                         "supported; expected None (T2V, I2V, TI2V)")
    heads, head_dim = int(cfg.get("num_attention_heads", 40)), int(cfg.get("attention_head_dim", 128))
    image_dim, added_kv = cfg.get("image_dim"), cfg.get("added_kv_proj_dim")
    if (image_dim is None) != (added_kv is None) or (added_kv is not None and int(added_kv) != heads * head_dim):
        raise ValueError(f"image_dim={image_dim}, added_kv_proj_dim={added_kv}: expected both None (text only) or "
                         f"image_dim with added_kv_proj_dim = heads * head dim = {heads * head_dim} (Wan2.1 I2V)")
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
        image_dim=None if image_dim is None else int(image_dim),
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
        "image_dim": cfg.image_dim,
        "added_kv_proj_dim": None if cfg.image_dim is None else cfg.hidden_size,
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


# ----------------------------------------------------------------------------- Wan2.2 A14B: two experts

# Subfolders of a diffusers Wan2.2 A14B pipeline folder holding each expert.
EXPERT_SUBFOLDERS = {"high_noise": "transformer", "low_noise": "transformer_2"}
MODEL_INDEX = "model_index.json"


def load_diffusers_wan_experts(path, dtype: torch.dtype | None = None, boundary_ratio: float | None = None):
    """``WanExperts`` of a diffusers Wan2.2 A14B pipeline folder: ``transformer/`` (high noise),
    ``transformer_2/`` (low noise) and the pipeline's ``boundary_ratio`` from model_index.json
    (or given)."""
    from ..models.experts import WanExperts

    path = os.fspath(path)
    missing = [d for d in EXPERT_SUBFOLDERS.values() if not os.path.isdir(os.path.join(path, d))]
    if missing:
        raise FileNotFoundError(f"{path} is not a two-expert (Wan2.2 A14B) pipeline folder: no {missing} subfolder")
    if boundary_ratio is None:
        index = os.path.join(path, MODEL_INDEX)
        ratio = None
        if os.path.isfile(index):
            with open(index) as f:
                ratio = json.load(f).get("boundary_ratio")
        if ratio is None:
            raise ValueError(f"{path}: {MODEL_INDEX} has no boundary_ratio; pass boundary_ratio "
                             "(Wan2.2 I2V A14B: 0.9, T2V A14B: 0.875)")
        boundary_ratio = float(ratio)
    experts = {k: load_diffusers_wan(os.path.join(path, d), dtype) for k, d in EXPERT_SUBFOLDERS.items()}
    return WanExperts(experts["high_noise"], experts["low_noise"], boundary_ratio)


def save_diffusers_wan(model: WanDiT, out_dir, dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """A single-process model as a diffusers ``WanTransformer3DModel`` folder (``rcm_megatron.checkpointing.diffusers_export``)."""
    from ..checkpointing.diffusers_export import export_diffusers
    from ..checkpointing.sources import StateDictSource

    source = StateDictSource(model.config, {k: v.detach() for k, v in model.state_dict().items()},
                             {"source": "rcm_megatron.WanDiT"})
    return export_diffusers(source, os.fspath(out_dir), dtype=dtype, overwrite=overwrite)


def save_diffusers_wan_experts(experts, out_dir, dtype: torch.dtype | None = None, overwrite: bool = False) -> None:
    """Write ``transformer/`` and ``transformer_2/`` into ``out_dir`` and record the boundary in its
    model_index.json (merged into an existing one, e.g. a copy of the base pipeline folder, so
    diffusers' ``WanImageToVideoPipeline.from_pretrained(out_dir)`` loads the experts)."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for key, sub in EXPERT_SUBFOLDERS.items():
        save_diffusers_wan(getattr(experts, key), os.path.join(out_dir, sub), dtype, overwrite)
    index_path = os.path.join(out_dir, MODEL_INDEX)
    index = {}
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index.update({sub: ["diffusers", "WanTransformer3DModel"] for sub in EXPERT_SUBFOLDERS.values()})
    index["boundary_ratio"] = experts.boundary_ratio
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
