"""Original Wan2.1 checkpoints (``WanModel`` of the Wan repository: ``.pth`` / single-file
safetensors / the official sharded release) <-> diffusers names, declaratively.

The map below is the same renaming diffusers applies in
``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`` (checked by
tests/test_convert_checkpoint.py against the installed diffusers): ``self_attn`` /
``cross_attn`` -> ``attn1`` / ``attn2``, ``q k v o`` -> ``to_q to_k to_v to_out.0``, the
affine cross-attention norm ``norm3`` -> ``norm2`` (the original ``norm1``/``norm2`` carry
no weights), ``ffn.0/2`` -> ``ffn.net.0.proj / ffn.net.2``, ``modulation`` ->
``scale_shift_table``, ``head.head`` -> ``proj_out``. Shapes are identical. Composing it
with ``diffusers_wan.NAME_MAP`` gives our names.

The architecture comes from the release's ``config.json`` (``_class_name: WanModel``:
dim, ffn_dim, freq_dim, in_dim, out_dim, num_heads, num_layers, eps, ...) or, for a bare
``.pth``, from the tensor shapes (heads = dim / 128, Wan's head size, unless given).
"""

from __future__ import annotations

import math
import re

from ..models.config import WanConfig

# Prefixes other tools put in front of the model's own names (ComfyUI single files).
STRIP_PREFIXES = ("model.diffusion_model.",)

# (original regex, diffusers replacement); anchored, first match wins; no match = unexpected key.
ORIGINAL_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"^patch_embedding\.(weight|bias)$", r"patch_embedding.\1"),
    (r"^text_embedding\.0\.(weight|bias)$", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"^text_embedding\.2\.(weight|bias)$", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"^time_embedding\.0\.(weight|bias)$", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"^time_embedding\.2\.(weight|bias)$", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"^time_projection\.1\.(weight|bias)$", r"condition_embedder.time_proj.\1"),
    (r"^blocks\.(\d+)\.self_attn\.([qkv])\.(weight|bias)$", r"blocks.\1.attn1.to_\2.\3"),
    (r"^blocks\.(\d+)\.self_attn\.o\.(weight|bias)$", r"blocks.\1.attn1.to_out.0.\2"),
    (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.weight$", r"blocks.\1.attn1.norm_\2.weight"),
    (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.(weight|bias)$", r"blocks.\1.attn2.to_\2.\3"),
    (r"^blocks\.(\d+)\.cross_attn\.o\.(weight|bias)$", r"blocks.\1.attn2.to_out.0.\2"),
    (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.weight$", r"blocks.\1.attn2.norm_\2.weight"),
    (r"^blocks\.(\d+)\.norm3\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^blocks\.(\d+)\.ffn\.0\.(weight|bias)$", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"^blocks\.(\d+)\.ffn\.2\.(weight|bias)$", r"blocks.\1.ffn.net.2.\2"),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^head\.head\.(weight|bias)$", r"proj_out.\1"),
    (r"^head\.modulation$", r"scale_shift_table"),
]

# Keys that identify a variant we do not model (named in the error instead of a long key list).
UNSUPPORTED_MARKERS = {
    "img_emb.": "image-conditioned Wan (I2V / FLF2V: img_emb, k_img, v_img)",
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
    name = strip_prefix(name)
    for pattern, repl in ORIGINAL_TO_DIFFUSERS:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def unsupported_variant(names) -> str | None:
    for n in names:
        n = strip_prefix(n)
        for marker, what in UNSUPPORTED_MARKERS.items():
            if n.startswith(marker) or f".{marker}" in n:
                return what
    return None


def config_from_wan_original(cfg: dict) -> WanConfig:
    """WanConfig from the original release's config.json (``_class_name: WanModel``)."""
    model_type = cfg.get("model_type", "t2v")
    if model_type != "t2v":
        raise ValueError(f"Wan model_type {model_type!r} is not supported; expected a text-to-video ('t2v') model")
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
    )
