"""The one reader: open any model source by path and build a ``WanDiT`` from it at the current
parallel layout (used by the trainer's ``--teacher-checkpoint``, the converter, generation and
evaluation alike).

``open_source(path)`` recognizes our checkpoints (a ``--save`` root or an ``iter_NNNNNNN``
folder), diffusers folders (transformer or pipeline), original Wan2.1 checkpoints and our
single-file model files. ``load_model(source)`` builds the model on the meta device, allocates
it and fills it: from our checkpoints through megatron-core (each rank reads its TP shards),
from the others tensor by tensor (each rank slices its shard), never holding a full copy.
``read_model_source(path)`` is every tensor in memory (the trainer's teacher); the architecture
comes from the source (config.json, the checkpoint's recorded ``model_config`` or the model
file), so ``--teacher-checkpoint`` needs no ``--model``. A training checkpoint gives its
power-EMA weights by default (the student's if there is no EMA).
"""

from __future__ import annotations

import json
import os

import torch

from ..models.config import WanConfig
from ..models.wan import WanDiT
from ..parallel import state as pstate
from ..parallel.sharding import shard_tensor
from .dist_source import CheckpointSource, load_into_model
from .errors import ConversionError
from .layout import is_checkpoint_dir
from .model_file import MODEL_FILE_FORMAT, is_model_file_blob
from .readers import DiffusersSource, WanOriginalSource
from .sources import StateDictSource, TensorSource


def _is_original_wan_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            return json.load(f).get("_class_name") == "WanModel"
    except (OSError, json.JSONDecodeError):
        return False


def open_source(path: str, kind: str | None = None, weights: str | None = None, iteration: int | None = None,
                config: WanConfig | dict | None = None, num_heads: int | None = None) -> TensorSource:
    """A TensorSource for ``path``; ``kind`` in (None: detect, 'checkpoint', 'diffusers', 'wan')."""
    if kind is None:
        if os.path.isdir(path):
            kind = ("checkpoint" if is_checkpoint_dir(path) else "wan" if _is_original_wan_dir(path) else "diffusers")
        elif os.path.isfile(path):
            kind = "file"
        else:
            raise ConversionError(f"{path}: no such file or directory (expected a diffusers folder, an rcm-megatron "
                                  "checkpoint directory, a .pt model file or an original Wan2.1 .pth/.safetensors)")
    if kind == "checkpoint":
        return CheckpointSource(path, weights, iteration)
    if kind == "diffusers":
        return DiffusersSource(path)
    if kind == "wan":
        return WanOriginalSource(path, config=config, num_heads=num_heads)
    if kind == "file":
        if path.endswith(".safetensors"):
            return WanOriginalSource(path, config=config, num_heads=num_heads)
        blob = None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # noqa: BLE001 - maybe not a zip file; WanOriginalSource says what is wrong
            pass
        if is_model_file_blob(blob):
            return StateDictSource(WanConfig.from_dict(blob["config"]), blob["model"],
                                   {"source": os.path.abspath(path), "format": MODEL_FILE_FORMAT, **blob.get("meta", {})},
                                   what=f"model file {path}")
        del blob
        return WanOriginalSource(path, config=config, num_heads=num_heads)
    raise ValueError(f"kind {kind!r}: expected checkpoint, diffusers, wan or file")


def build_empty_model(cfg: WanConfig, device="cpu", **kwargs) -> WanDiT:
    """A WanDiT at the current TP layout with uninitialized storage (no random init of 14B parameters)."""
    with torch.device("meta"):
        model = WanDiT(cfg, **kwargs)
    attrs = {n: dict(p.__dict__) for n, p in model.named_parameters()}  # tp_split_dim etc.
    model.to_empty(device=device)
    for n, p in model.named_parameters():
        p.__dict__.update(attrs[n])
    return model


@torch.no_grad()
def load_model(source: TensorSource, device="cpu", dtype: torch.dtype | None = None, **kwargs) -> WanDiT:
    """Eval-mode WanDiT (no grad) holding ``source``'s weights, sharded for this rank."""
    model = build_empty_model(source.config, device, **kwargs)
    if isinstance(source, CheckpointSource):
        load_into_model(model, source)
    else:
        source.check()
        rank, size = pstate.tensor_parallel_rank(), pstate.tensor_parallel_world_size()
        for name, p in model.named_parameters():
            full = source.read(name)
            p.copy_(shard_tensor(full, getattr(p, "tp_split_dim", None), rank, size))
            del full
    model.requires_grad_(False).eval()
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype) if dtype == torch.float64 else model.to_dtype(dtype)
    return model


def read_full_state_dict(source: TensorSource) -> dict:
    """Every tensor of ``source`` in memory (the trainer's teacher path); checked first."""
    source.check()
    if isinstance(source, CheckpointSource):
        return source.read_many(list(source.tensors))
    return {n: source.read(n) for n in source.tensors}


def describe(source: TensorSource) -> str:
    c = source.config
    n = sum(i.nbytes // i.dtype.itemsize for i in source.tensors.values())
    return (f"{source.what}: {n / 1e9:.3f}B parameters, {c.num_layers} layers, width {c.hidden_size}, "
            f"{c.num_attention_heads} heads, ffn {c.ffn_hidden_size}, in/out channels {c.in_channels}/{c.out_channels}, "
            f"text dim {c.text_dim}")


def read_model_source(path: str, weights: str | None = None,
                      iteration: int | None = None) -> tuple[WanConfig, dict, dict]:
    """(config, full state dict in our names, provenance) of a teacher/student source, checked
    against its architecture before anything is built."""
    with open_source(path, weights=weights, iteration=iteration) as src:
        return src.config, read_full_state_dict(src), src.provenance


def open_model(path: str, weights: str | None = None, iteration: int | None = None,
               device="cpu") -> tuple[WanDiT, dict]:
    """(eval-mode float32 WanDiT without grad, provenance) from a path (the evaluation tools)."""
    with open_source(path, weights=weights, iteration=iteration) as src:
        return load_model(src, device), dict(src.provenance)
