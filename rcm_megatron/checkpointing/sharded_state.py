"""Sharded state dicts for megatron-core ``dist_checkpointing``.

Every parameter becomes a ``ShardedTensor`` keyed by its *global* name (blocks are named
by global layer index, so pipeline stages never collide) with its tensor-parallel split
(``tp_split_dim``) as the sharding axis. Exactly one rank writes each piece: ``replica_id``
is zero only on the first TP rank of replicated tensors, the first CP and DP rank, and the
first pipeline stage for tensors every stage holds (the time embedding). Loading builds the
same structure for the *current* layout, so a checkpoint reshards across TP/PP/CP/DP.

The AdamW moments are sharded exactly like their parameters; the power-EMA shadow too, and
each of its tensors is written by the one DP x CP rank that keeps it (``rcm.ema``);
the step counts, configs and iteration are common state; each rank's RNG state is a
``ShardedObject``. Under ZeRO-3 (FSDP2 DTensors) every tensor above is written as each rank's
rows of the same global tensor, so those checkpoints reshard to any layout and backend too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..parallel import state as pstate

PIPELINE_REPLICATED = ("time_embedding.",)


def _ranks():
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 0, 0, 0
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return 0, 0, 0, dist.get_rank()
    return (mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank(),
            mpu.get_context_parallel_rank(), mpu.get_data_parallel_rank())


def _sharded(key: str, name: str, tensor: torch.Tensor, split: int | None, dp_sharded: bool = False):
    """``dp_sharded``: the tensor lives on one DP x CP rank only (the EMA shadow), which writes it.
    A DTensor (ZeRO-3) becomes its rows of the global tensor (``_zero3_piece``)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    if _is_dtensor(tensor):
        return _zero3_piece(key, name, tensor, split)
    pp, tp_rank, cp, dp = _ranks()
    if dp_sharded:
        cp = dp = 0
    tp = pstate.tensor_parallel_world_size()
    pp_replica = pp if name.startswith(PIPELINE_REPLICATED) else 0
    if split is not None and tp > 1:
        return ShardedTensor.from_rank_offsets(key, tensor, (split, tp_rank, tp), replica_id=(pp_replica, 0, cp, dp))
    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=(pp_replica, tp_rank, cp, dp))


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def local_data(t: torch.Tensor) -> torch.Tensor:
    """What a rank holds of ``t``: a DTensor's local shard, else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _zero3_piece(key: str, name: str, tensor, split: int | None):
    """This rank's FSDP2 shard of a (TP-local) parameter as a piece of the global tensor: FSDP2
    splits dim 0 over DP x CP like ``torch.chunk`` (ceil(rows / n) each, the last ones shorter or
    empty), so pieces are uneven: megatron-core's irregular-grid ShardedTensor (explicit global
    offset, ``axis_fragmentations=None``), whose coverage DCP checks. Every DP x CP rank writes its
    own rows; TP replicas and pipeline replicas as in ``_sharded``. None for an empty shard."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from torch.distributed.tensor import Shard

    local = tensor.to_local()
    if local.numel() == 0:
        return None
    if tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"{key}: expected an FSDP2 parameter sharded on dim 0, got placements {tensor.placements}")
    whole = tuple(tensor.shape)
    mesh = tensor.device_mesh
    rows = -(-whole[0] // mesh.size())
    global_shape, offset = list(whole), [0] * len(whole)
    offset[0] = mesh.get_local_rank() * rows
    pp, tp_rank, _, _ = _ranks()
    tp = pstate.tensor_parallel_world_size()
    pp_replica = pp if name.startswith(PIPELINE_REPLICATED) else 0
    replica = (pp_replica, tp_rank, 0, 0)
    if split is not None and tp > 1:
        global_shape[split] *= tp
        offset[split] += tp_rank * whole[split]
        replica = (pp_replica, 0, 0, 0)
    return ShardedTensor(key, local, local.dtype, tuple(local.shape), tuple(global_shape), tuple(offset), None,
                         replica_id=replica)


def _split_dims(model: nn.Module) -> dict:
    return {n: getattr(p, "tp_split_dim", None) for n, p in model.named_parameters()}


def model_sharded_state_dict(model: nn.Module, prefix: str) -> dict:
    dims = _split_dims(model)
    # The Parameter itself (not a detached view): megatron-core's distributed optimizer maps its
    # state to model tensors by object identity.
    return _present({n: _sharded(f"{prefix}.{n}", n, p, dims[n]) for n, p in model.named_parameters()})


def _present(d: dict) -> dict:
    """Without the empty ZeRO-3 shards (nothing of those tensors on this rank)."""
    return {k: v for k, v in d.items() if v is not None}


def tensors_sharded_state_dict(tensors: dict, model: nn.Module, prefix: str, dp_sharded: bool = False) -> dict:
    """Name-keyed tensors laid out like ``model``'s parameters (e.g. the EMA shadow); with
    ``dp_sharded`` each DP x CP rank holds a different subset of the names."""
    dims = _split_dims(model)
    return _present({n: _sharded(f"{prefix}.{n}", n, t, dims[n], dp_sharded) for n, t in tensors.items()})


def ensure_adam_state(opt: torch.optim.Optimizer) -> None:
    """Materialize AdamW state (zeros, step 0) so a fresh optimizer has tensors to save/load into."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_sharded_state_dict(opt: torch.optim.Optimizer, model: nn.Module, prefix: str) -> dict:
    ensure_adam_state(opt)
    names = {p: n for n, p in model.named_parameters()}
    dims = _split_dims(model)
    moments, steps = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            n, st = names[p], opt.state[p]
            steps[n] = float(st["step"])
            present = _present({k: _sharded(f"{prefix}.{k}.{n}", n, st[k], dims[n])
                                for k in ("exp_avg", "exp_avg_sq")})
            if present:  # an empty ZeRO-3 shard has none (an empty dict would be non-sharded state)
                moments[n] = present
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"moments": moments, "steps": steps, "param_groups": groups}


def load_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, loaded: dict) -> None:
    """Copy a loaded ``optimizer_sharded_state_dict`` back (tensors were loaded in place)."""
    names = {p: n for n, p in model.named_parameters()}
    for group, saved in zip(opt.param_groups, loaded["param_groups"]):
        for k, v in saved.items():
            group[k] = v
        for p in group["params"]:
            n, st = names[p], opt.state[p]
            st["step"] = torch.tensor(loaded["steps"][n], dtype=torch.float32)
            for k, src in loaded["moments"].get(n, {}).items():  # (none of an empty ZeRO-3 shard)
                copy_into(st[k], src)


def rng_sharded_object(key: str, data):
    from megatron.core.dist_checkpointing import ShardedObject

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return ShardedObject(key, data, (world,), (rank,), replica_id=0)


def copy_into(dst: torch.Tensor, loaded: torch.Tensor) -> None:
    """A loaded tensor into the one it was loaded for (``dst`` local data), unless loaded in place."""
    dst = local_data(dst)
    if loaded.data_ptr() != dst.data_ptr():
        with torch.no_grad():
            dst.copy_(loaded)


def copy_loaded_into_model(model: nn.Module, loaded: dict) -> None:
    for n, p in model.named_parameters():
        if n in loaded:  # (not an empty ZeRO-3 shard)
            copy_into(p, loaded[n])
