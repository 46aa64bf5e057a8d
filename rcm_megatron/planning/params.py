"""Parameter shapes of one rank's stage of a Wan DiT, without building it.

The planner needs every parameter's name, shape on this tensor-parallel rank and dtype class
(kept in fp32 under bf16, as ``WanDiT.to_dtype`` keeps the time embedding, modulation tables and
norms) for models far larger than this machine. The shapes follow ``models/`` exactly
(tests/test_planning.py compares them with built models at TP 1 and TP 2, name by name).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..models.config import WanConfig
from ..models.wan import FP32_MODULE_KEYWORDS


@dataclass(frozen=True)
class ParamShape:
    shape: tuple[int, ...]
    keep_fp32: bool  # stays fp32 when the model runs in bf16

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _attention(prefix: str, d: int, tp: int) -> dict[str, tuple]:
    out = {}
    for lin in ("to_q", "to_k", "to_v"):
        out[f"{prefix}.{lin}.weight"] = (d // tp, d)
        out[f"{prefix}.{lin}.bias"] = (d // tp,)
    out[f"{prefix}.to_out.weight"] = (d, d // tp)
    out[f"{prefix}.to_out.bias"] = (d,)
    out[f"{prefix}.norm_q.weight"] = (d // tp,)
    out[f"{prefix}.norm_k.weight"] = (d // tp,)
    return out


def block_shapes(cfg: WanConfig, tp: int = 1) -> dict[str, tuple]:
    """Shapes of one ``WanBlock``'s parameters on a TP rank (names relative to the block)."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    out = {"scale_shift_table": (1, 6, d)} | _attention("attn1", d, tp)  # own parameters come first
    if cfg.cross_attn_norm:
        out["norm2.weight"], out["norm2.bias"] = (d,), (d,)
    out |= _attention("attn2", d, tp)
    out |= {"ffn.fc1.weight": (f // tp, d), "ffn.fc1.bias": (f // tp,), "ffn.fc2.weight": (d, f // tp),
            "ffn.fc2.bias": (d,)}
    return out


@functools.lru_cache(maxsize=256)
def stage_shapes(cfg: WanConfig, tp: int = 1, pre_process: bool = True, post_process: bool = True,
                 layer_range: tuple[int, int] | None = None, bf16: bool = True) -> dict[str, ParamShape]:
    """name -> ParamShape of every parameter of this rank's ``WanDiT`` (same names and order).
    Cached: do not modify the returned dict."""
    d = cfg.hidden_size
    first, last = layer_range if layer_range is not None else (0, cfg.num_layers)
    shapes: dict[str, tuple] = {}
    if post_process:  # registered directly on the model, so listed before the submodules
        shapes["scale_shift_table"] = (1, 2, d)
    if pre_process:
        shapes["patch_embedding.proj.weight"] = (d, cfg.in_channels, *cfg.patch_size)
        shapes["patch_embedding.proj.bias"] = (d,)
        shapes |= {"text_embedding.linear_1.weight": (d, cfg.text_dim), "text_embedding.linear_1.bias": (d,),
                   "text_embedding.linear_2.weight": (d, d), "text_embedding.linear_2.bias": (d,)}
    shapes |= {"time_embedding.linear_1.weight": (d, cfg.freq_dim), "time_embedding.linear_1.bias": (d,),
               "time_embedding.linear_2.weight": (d, d), "time_embedding.linear_2.bias": (d,),
               "time_embedding.time_proj.weight": (6 * d, d), "time_embedding.time_proj.bias": (6 * d,)}
    blk = block_shapes(cfg, tp)
    for i in range(first, last):
        shapes |= {f"blocks.{i}.{k}": v for k, v in blk.items()}
    if post_process:
        out_dim = cfg.out_channels * cfg.patch_volume
        shapes |= {"proj_out.weight": (out_dim, d), "proj_out.bias": (out_dim,)}
    return {n: ParamShape(tuple(s), bf16 and any(k in n for k in FP32_MODULE_KEYWORDS)) for n, s in shapes.items()}


def count(shapes: dict[str, ParamShape]) -> tuple[int, int]:
    """(elements kept in fp32, elements in the compute dtype)."""
    fp32 = sum(p.numel for p in shapes.values() if p.keep_fp32)
    return fp32, sum(p.numel for p in shapes.values()) - fp32


def fsdp_shard_numel(shape: tuple[int, ...], shards: int) -> int:
    """Elements one rank holds of a parameter sharded on dim 0 by FSDP2 (``fully_shard``: equal
    chunks of ceil(dim0 / shards) rows, the padding counted, as its sharded storage is padded)."""
    rows = -(-shape[0] // shards)
    return rows * math.prod(shape[1:])
