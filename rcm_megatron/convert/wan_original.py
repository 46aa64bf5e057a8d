"""Original Wan checkpoints (``WanModel`` of the Wan2.1 / Wan2.2 repositories: ``.pth`` /
single-file safetensors / the official sharded release) <-> diffusers names, declaratively,
both directions compiled from one template table.

The map below is the same renaming diffusers applies in
``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`` (checked by
tests/test_convert_checkpoint.py against the installed diffusers): ``self_attn`` /
``cross_attn`` -> ``attn1`` / ``attn2``, ``q k v o`` -> ``to_q to_k to_v to_out.0``, the
affine cross-attention norm ``norm3`` -> ``norm2`` (the original ``norm1``/``norm2`` carry
no weights), ``ffn.0/2`` -> ``ffn.net.0.proj / ffn.net.2``, ``modulation`` ->
``scale_shift_table``, ``head.head`` -> ``proj_out``; I2V: ``img_emb.proj.{0,1,3,4}`` ->
``condition_embedder.image_embedder.{norm1, ff.net.0.proj, ff.net.2, norm2}``, ``k_img v_img
norm_k_img`` -> ``add_k_proj add_v_proj norm_added_k``. Shapes are identical. Composing it
with ``diffusers_wan.NAME_MAP`` gives our names. Wan2.2 A14B releases hold the two experts in
``high_noise_model/`` and ``low_noise_model/`` (``EXPERT_FOLDERS``).

The architecture comes from the release's ``config.json`` (``_class_name: WanModel``:
dim, ffn_dim, freq_dim, in_dim, out_dim, num_heads, num_layers, eps, ...) or, for a bare
``.pth``, from the tensor shapes (heads = dim / 128, Wan's head size, unless given).
"""

from __future__ import annotations

import math
import re

from ..models.config import WanConfig
from .diffusers_wan import NAME_MAP, REVERSE_MAP, _map_name, compile_name_rules

# Prefixes other tools put in front of the model's own names (ComfyUI single files).
STRIP_PREFIXES = ("model.diffusion_model.",)

# (original name, diffusers name) templates; placeholders as in ``diffusers_wan.NAME_FIELDS``.
ORIGINAL_TEMPLATES: list[tuple[str, str]] = [
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("img_emb.proj.0.{p}", "condition_embedder.image_embedder.norm1.{p}"),
    ("img_emb.proj.1.{p}", "condition_embedder.image_embedder.ff.net.0.proj.{p}"),
    ("img_emb.proj.3.{p}", "condition_embedder.image_embedder.ff.net.2.{p}"),
    ("img_emb.proj.4.{p}", "condition_embedder.image_embedder.norm2.{p}"),
    ("blocks.{i}.self_attn.{qkv}.{p}", "blocks.{i}.attn1.to_{qkv}.{p}"),
    ("blocks.{i}.self_attn.o.{p}", "blocks.{i}.attn1.to_out.0.{p}"),
    ("blocks.{i}.self_attn.norm_{qk}.weight", "blocks.{i}.attn1.norm_{qk}.weight"),
    ("blocks.{i}.cross_attn.{qkv}.{p}", "blocks.{i}.attn2.to_{qkv}.{p}"),
    ("blocks.{i}.cross_attn.o.{p}", "blocks.{i}.attn2.to_out.0.{p}"),
    ("blocks.{i}.cross_attn.norm_{qk}.weight", "blocks.{i}.attn2.norm_{qk}.weight"),
    ("blocks.{i}.cross_attn.{kv}_img.{p}", "blocks.{i}.attn2.add_{kv}_proj.{p}"),
    ("blocks.{i}.cross_attn.norm_k_img.weight", "blocks.{i}.attn2.norm_added_k.weight"),
    ("blocks.{i}.norm3.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.ffn.0.{p}", "blocks.{i}.ffn.net.0.proj.{p}"),
    ("blocks.{i}.ffn.2.{p}", "blocks.{i}.ffn.net.2.{p}"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "scale_shift_table"),
]
ORIGINAL_TO_DIFFUSERS = compile_name_rules(ORIGINAL_TEMPLATES)
DIFFUSERS_TO_ORIGINAL = compile_name_rules(ORIGINAL_TEMPLATES, reverse=True)

# Folders of the two experts in the original Wan2.2 A14B release (diffusers: transformer / transformer_2).
EXPERT_FOLDERS = {"high_noise": "high_noise_model", "low_noise": "low_noise_model"}

# Keys that identify a variant we do not model (named in the error instead of a long key list).
UNSUPPORTED_MARKERS = {
    "img_emb.emb_pos": "Wan FLF2V (first-last-frame: img_emb.emb_pos)",
    "vace_blocks.": "Wan VACE (vace_blocks)",
    "motion_encoder.": "Wan Animate (motion_encoder)",
    "decoder.middle.": "the Wan VAE, not the DiT",
}

WAN_HEAD_DIM = 128


def strip_prefix(name: str) -> str:
    for p in STRIP_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def original_to_diffusers_name(name: str) -> str | None:
    """Diffusers name of an original Wan parameter name (prefixes stripped), None if unknown."""
    return _map_name(strip_prefix(name), ORIGINAL_TO_DIFFUSERS)


def diffusers_to_original_name(name: str) -> str | None:
    """Original Wan name of a diffusers parameter name, None if unknown."""
    return _map_name(name, DIFFUSERS_TO_ORIGINAL)


def original_to_ours(state_dict: dict) -> dict:
    """An original-layout state dict (prefixes stripped) in our names; unknown names raise one error."""
    out, unknown = {}, []
    for k, v in state_dict.items():
        d = original_to_diffusers_name(k)
        ours = None if d is None else _map_name(d, NAME_MAP)
        if ours is None:
            unknown.append(k)
        else:
            out[ours] = v
    if unknown:
        raise KeyError(f"not original Wan parameter names: {sorted(unknown)}")
    return out


def ours_to_original(state_dict: dict) -> dict:
    """Our state dict in the original Wan names (what ``WanModel.load_state_dict`` takes)."""
    return {diffusers_to_original_name(_map_name(k, REVERSE_MAP)): v for k, v in state_dict.items()}


def unsupported_variant(names) -> str | None:
    for n in names:
        n = strip_prefix(n)
        for marker, what in UNSUPPORTED_MARKERS.items():
            if n.startswith(marker) or f".{marker}" in n:
                return what
    return None


def image_dim_from_shapes(shapes: dict[str, tuple]) -> int | None:
    """CLIP width of an I2V checkpoint's ``img_emb`` (names stripped), None without one."""
    if not any(n.startswith("img_emb.") for n in shapes):
        return None
    if "img_emb.proj.0.weight" not in shapes or len(shapes["img_emb.proj.0.weight"]) != 1:
        raise ValueError("image-conditioned Wan (I2V: img_emb) without a 1-D img_emb.proj.0.weight (the image "
                         f"LayerNorm): cannot tell image_dim; found {shapes.get('img_emb.proj.0.weight')}")
    return int(shapes["img_emb.proj.0.weight"][0])


def config_from_wan_original(cfg: dict, shapes: dict[str, tuple] | None = None) -> WanConfig:
    """WanConfig from the original release's config.json (``_class_name: WanModel``).

    Wan2.1 I2V and Wan2.2 I2V A14B share ``model_type: i2v`` but only the first has the CLIP
    branch (``img_emb``): image_dim comes from the tensor ``shapes`` (names stripped) when given.
    """
    model_type = cfg.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v", "ti2v"):
        raise ValueError(f"Wan model_type {model_type!r} is not supported; expected 't2v', 'i2v' or 'ti2v'")
    if not cfg.get("qk_norm", True):
        raise ValueError("qk_norm=False is not supported; Wan2.1 normalizes q and k")
    dim, heads = int(cfg.get("dim", 2048)), int(cfg.get("num_heads", 16))
    return WanConfig(
        num_layers=int(cfg.get("num_layers", 32)),
        hidden_size=dim,
        ffn_hidden_size=int(cfg.get("ffn_dim", 8192)),
        num_attention_heads=heads,
        in_channels=int(cfg.get("in_dim", 16)),
        out_channels=int(cfg.get("out_dim", 16)),
        text_dim=int(cfg.get("text_dim", 4096)),
        freq_dim=int(cfg.get("freq_dim", 256)),
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        eps=float(cfg.get("eps", 1e-6)),
        cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
        image_dim=None if shapes is None else image_dim_from_shapes(shapes),
    )


def infer_config_from_shapes(shapes: dict[str, tuple], num_heads: int | None = None, eps: float = 1e-6) -> WanConfig:
    """WanConfig read off the tensor shapes of an original-layout state dict (names stripped)."""
    need = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
            "blocks.0.ffn.0.weight", "head.head.weight"]
    missing = [n for n in need if n not in shapes]
    if missing:
        raise KeyError(f"cannot infer the Wan architecture: the state dict lacks {missing} "
                       f"(is this a Wan2.1 DiT in the original layout?)")
    pe = shapes["patch_embedding.weight"]  # [dim, in, pt, ph, pw]
    if len(pe) != 5:
        raise ValueError(f"patch_embedding.weight has shape {tuple(pe)}, expected [dim, in_dim, pt, ph, pw]")
    dim, in_dim, patch = int(pe[0]), int(pe[1]), tuple(int(p) for p in pe[2:])
    image_dim = image_dim_from_shapes(shapes)
    layers = 1 + max(int(m.group(1)) for n in shapes if (m := re.match(r"^blocks\.(\d+)\.", n)))
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise ValueError(f"dim {dim} is not a multiple of Wan's head size {WAN_HEAD_DIM}; pass the number of "
                             "heads (--num-heads) or a config.json (--config)")
        num_heads = dim // WAN_HEAD_DIM
    return WanConfig(
        num_layers=layers, hidden_size=dim, ffn_hidden_size=int(shapes["blocks.0.ffn.0.weight"][0]),
        num_attention_heads=int(num_heads), in_channels=in_dim,
        out_channels=int(shapes["head.head.weight"][0]) // math.prod(patch),
        text_dim=int(shapes["text_embedding.0.weight"][1]), freq_dim=int(shapes["time_embedding.0.weight"][1]),
        patch_size=patch, eps=eps, cross_attn_norm="blocks.0.norm3.weight" in shapes,
        image_dim=image_dim,
    )
