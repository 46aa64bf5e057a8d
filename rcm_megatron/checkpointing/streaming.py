"""Per-rank streaming load of a teacher: each rank reads only its own part of every tensor.

The trainer's ``read_model_source`` reads the whole model on every rank (57 GB of fp32 at 14B,
times 8 ranks of a node). Here a rank asks the source for each parameter of its own pipeline
stage and reads only the rows / columns of its tensor-parallel shard, and of those, under ZeRO-3
(FSDP2 ``DTensor`` parameters, dim 0 sharded over DP x CP), only its own rows:

- diffusers folders and single-file / release-folder safetensors: ``safe_open(...).get_slice``
  reads exactly the requested slice from the file;
- original Wan ``.pth``: ``torch.load(mmap=True)``, then the slice is copied out (only its
  pages are touched for row slices);
- our checkpoints (megatron-core dist_checkpointing): one whole tensor at a time, sliced, freed.

Sources come from ``checkpointing.loading.open_source`` (the same names, checks and errors as the
converter); shapes are checked against the full architecture before anything is read.
"""

from __future__ import annotations

import torch
from torch import nn

from ..parallel import state as pstate
from .loading import open_source
from .errors import ConversionError


def rank_slices(full_shape: tuple[int, ...], tp_dim: int | None, tp_rank: int, tp_size: int,
                fsdp_rows: tuple[int, int] | None = None) -> tuple[slice, ...]:
    """The slices of a full tensor this rank holds: its TP chunk along ``tp_dim`` (torch.chunk
    order, as ``parallel.sharding``), then rows [start, stop) of that chunk (FSDP2's dim-0 shard)."""
    sl = [slice(None)] * len(full_shape)
    if tp_dim is not None and tp_size > 1:
        n = full_shape[tp_dim] // tp_size
        sl[tp_dim] = slice(tp_rank * n, (tp_rank + 1) * n)
    if fsdp_rows is not None:
        base = sl[0].start or 0
        sl[0] = slice(base + fsdp_rows[0], base + fsdp_rows[1])
    return tuple(sl)


def read_slice(source, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
    """Read only ``slices`` of tensor ``name`` of a TensorSource (see the module docstring)."""
    info = source.tensors[name]
    file = getattr(info, "file", None)
    if file is not None and str(file).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return f.get_slice(info.key)[slices].contiguous()
    torch_file = getattr(source, "_torch", None)
    if torch_file is not None and file is not None:
        return torch_file.state_dict()[info.key][slices].clone()
    return source.read(name)[slices].clone()


def _fsdp_rows(p) -> tuple[int, int] | None:
    """Rows [start, stop) of dim 0 a DTensor parameter holds (FSDP2: ceil(dim0 / n) per rank)."""
    if not hasattr(p, "to_local"):
        return None
    mesh = p.device_mesh
    n, k = mesh.size(), mesh.get_local_rank()
    rows = -(-p.shape[0] // n)
    start = min(k * rows, p.shape[0])
    return start, min(start + rows, p.shape[0])


@torch.no_grad()
def load_rank_weights(model: nn.Module, path: str, kind: str | None = None) -> dict:
    """Fill ``model`` (this rank's stage, TP shards, optionally FSDP2-sharded) from ``path``,
    reading only this rank's part of each tensor. Returns {'bytes_read': ...}."""
    tp_rank, tp_size = pstate.tensor_parallel_rank(), pstate.tensor_parallel_world_size()
    read = 0
    # The model's architecture also tells a bare original-Wan .pth its head count.
    with open_source(path, kind=kind, config=getattr(model, "config", None)) as source:
        source.check()
        missing = [n for n, _ in model.named_parameters() if n not in source.tensors]
        if missing:
            raise ConversionError(f"{path}: has no tensors for {missing[:5]} ({len(missing)} in all)")
        for name, p in model.named_parameters():
            full = tuple(source.tensors[name].shape)
            rows = _fsdp_rows(p)
            local = p.to_local() if rows is not None else p
            t = read_slice(source, name, rank_slices(full, getattr(p, "tp_split_dim", None), tp_rank, tp_size, rows))
            if tuple(t.shape) != tuple(local.shape):
                raise ConversionError(f"{path}: {name} slice {tuple(t.shape)} does not fit this rank's "
                                      f"{tuple(local.shape)} (full {full})")
            local.copy_(t.to(local.dtype))
            read += t.numel() * t.element_size()
            del t
    return {"bytes_read": read}



def build_sharded_model(cfg, path: str, device="cpu", zero3: bool = True, param_dtype=None, **stage) -> nn.Module:
    """This rank's stage of a model (``stage``: WanDiT's pre_process / post_process / layer_range)
    built on the meta device, sharded over DP x CP (``zero3``), materialized empty on ``device`` and
    filled from ``path`` with only this rank's part: no rank ever holds the whole model, nor even its
    whole TP shard under ZeRO-3."""
    from ..models import WanDiT
    from ..parallel import fsdp

    with torch.device("meta"):
        model = WanDiT(cfg, **stage)
    if zero3:
        fsdp.shard_model(model, param_dtype=param_dtype)
    attrs = fsdp.parallel_attributes(model)
    model.to_empty(device=device)  # new parameter objects: the TP attributes go back on them
    fsdp.restore_parallel_attributes(model, attrs)
    load_rank_weights(model, path)
    return model


__all__ = ["build_sharded_model", "load_rank_weights", "rank_slices", "read_slice"]
