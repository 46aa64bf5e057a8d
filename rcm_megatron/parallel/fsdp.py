"""Parameter sharding (ZeRO-3) of the teacher, student and fake score over DP x CP, with FSDP2.

Library: torch's FSDP2 (``torch.distributed.fsdp.fully_shard``). It runs on CPU with gloo
(checked in torch 2.13: fp64 outputs and gradients equal an unsharded model exactly), so the
layouts are tested the way every other layout here is. megatron-core 0.16.1's Megatron-FSDP
(``megatron.core.distributed.fsdp``) does not: its buffers, side streams and device checks call
``torch.cuda`` unconditionally.

Group: megatron-core's data-parallel group *with* context parallelism (in a TP2 x CP4 node DP
alone is 1, yet the 4 CP ranks hold identical parameters), made a DeviceMesh with
``DeviceMesh.from_group``. Composition:

- TP / SP: each rank's parameters are already its TP shards (plain tensors); FSDP2 shards those
  further on dim 0 over DP x CP and gathers them back before use, so the model code sees the same
  TP-local tensors as without sharding. The parallel attributes (``tp_split_dim`` ...) are put back
  on the sharded parameters.
- CP: gradients are partial (own tokens) on each CP rank and must be SUMMED over DP x CP, as the
  trainer's all-reduce does; the reduce-scatter is told not to average (divide factor 1).
- PP: each stage shards its own blocks; on a stage (not the whole model) the entry points the
  pipeline calls (``embed``, ``time_conditioning``, ``head``) are registered as forward methods, so
  the root unit (embeddings, time embedding, head) is gathered for them as for ``forward``.
- The tangent pass: ``forward_with_tangent`` is registered with ``register_fsdp_forward_method``,
  so it gathers (and reshards) parameters exactly as ``forward``; it runs without a graph.

Units: one per transformer block (its parameters are gathered for the block and freed after it,
the next one prefetched) and the root. Mixed precision: bf16 compute, fp32 sharded parameters,
fp32 gradient reduction (``MixedPrecisionPolicy``); the teacher, frozen, is kept in its own dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

FORWARD_METHODS = ("forward_with_tangent",)
STAGE_METHODS = ("embed", "time_conditioning", "head")  # what the pipeline schedule calls on a stage
_PARALLEL_ATTRIBUTES = ("tp_split_dim", "tensor_model_parallel", "partition_dim", "partition_stride")


def shard_group():
    """DP x CP process group (None in a single process)."""
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_group(with_context_parallel=True)


def shard_mesh(group=None, device_type: str | None = None):
    """A 1-D DeviceMesh over ``group`` (default: DP x CP)."""
    from torch.distributed.device_mesh import DeviceMesh

    group = shard_group() if group is None else group
    if device_type is None:
        device_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device_type=device_type)


def shard_model(model: nn.Module, mesh=None, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
                cpu_offload: bool = False) -> nn.Module:
    """Shard ``model`` (a WanDiT or one pipeline stage of it) in place over ``mesh`` (default
    DP x CP): one FSDP2 unit per block plus the root. ``param_dtype`` bf16 for compute in bf16
    (None: the parameters' own dtype, e.g. fp64 in tests); ``cpu_offload`` keeps the sharded
    parameters, gradients and (so) optimizer state on the host (FSDP2's CPUOffloadPolicy)."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)

    mesh = shard_mesh() if mesh is None else mesh
    attrs = {name: {a: getattr(p, a) for a in _PARALLEL_ATTRIBUTES if hasattr(p, a)}
             for name, p in model.named_parameters()}
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in model.blocks.values():
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    whole = getattr(model, "pre_process", True) and getattr(model, "post_process", True)
    for method in FORWARD_METHODS + (() if whole else STAGE_METHODS):  # forward() calls the stage methods
        if hasattr(model, method):                                     # itself: registering them would
            register_fsdp_forward_method(model, method)                # gather the root twice per pass
    # Losses are sums over samples divided by the global batch: gradients add over DP x CP
    # (every unit's reduce-scatter; the setting is per unit).
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
    for name, p in model.named_parameters():
        for a, v in attrs.get(name, {}).items():
            setattr(p, a, v)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (DTensor) parameter or gradient; plain tensors unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded (TP-local) parameters of a sharded model, on every rank (collective)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}
