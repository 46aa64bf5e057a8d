"""Full <-> tensor-parallel state dicts.

Each sharded parameter records its split dimension (``tp_split_dim``, set by the parallel
layers); everything else is replicated. Shards are equal contiguous chunks, rank order
(``torch.chunk``), the same slicing ``WanDiT.reset_parameters`` uses, so a full state dict
(a teacher converted from diffusers, say) loads under any TP size, and a TP model gathers
back to exactly the TP = 1 model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from . import state


def tensor_parallel_split_dims(model: nn.Module) -> dict[str, int | None]:
    """Name -> split dimension (None: replicated) for every parameter and buffer of ``model``."""
    dims = {name: getattr(p, "tp_split_dim", None) for name, p in model.named_parameters()}
    dims.update({name: None for name, _ in model.named_buffers()})
    return dims


def shard_tensor(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """This rank's chunk of a full tensor along ``dim`` (the tensor itself when dim is None)."""
    if dim is None or size == 1:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of a {tuple(full.shape)} tensor is not divisible by "
                         f"tensor-model-parallel-size {size}")
    return full.chunk(size, dim=dim)[rank]


def shard_state_dict(full_state: dict, model: nn.Module, rank: int | None = None,
                     size: int | None = None) -> dict:
    """The state dict of ``model``'s TP rank (default: this process's) cut from a full one.

    Every key of ``model.state_dict()`` must be present; other keys (the blocks of other
    pipeline stages, say) are ignored.
    """
    rank = state.tensor_parallel_rank() if rank is None else rank
    size = state.tensor_parallel_world_size() if size is None else size
    dims = tensor_parallel_split_dims(model)
    missing = sorted(set(dims) - set(full_state))
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} keys of the model, e.g. {missing[:5]}")
    return {name: shard_tensor(full_state[name], dim, rank, size) for name, dim in dims.items()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full_state: dict) -> None:
    """Copy this rank's shards of a full state dict into ``model`` (shapes checked)."""
    local = shard_state_dict(full_state, model)
    own = model.state_dict()
    for name, t in local.items():
        if own[name].shape != t.shape:
            raise ValueError(f"{name}: shard of shape {tuple(t.shape)} does not fit the model's "
                             f"{tuple(own[name].shape)}")
    model.load_state_dict(local, strict=True)


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    group = state.tensor_parallel_group()
    parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def gather_state_dict(model: nn.Module, tensors: dict | None = None, device="cpu") -> dict:
    """Full tensors from the TP shards, on every TP rank (a collective: all TP ranks call it).

    ``tensors`` defaults to ``model.state_dict()``; pass e.g. ``{n: p.grad for n, p in
    model.named_parameters()}`` to gather gradients (None entries are skipped).
    """
    dims = tensor_parallel_split_dims(model)
    tensors = model.state_dict() if tensors is None else tensors
    tp = state.tensor_parallel_world_size()
    out = {}
    for name, t in tensors.items():
        if t is None:
            continue
        dim = dims.get(name)
        full = _gather(t, dim) if dim is not None and tp > 1 else t
        out[name] = full.detach().to(device) if device is not None else full.detach()
    return out
