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
  pipeline calls from outside (``embed`` on the first stage, ``time_conditioning`` on the others,
  ``head`` on the last: ``stage_entry_methods``) are registered as forward methods, so the root
  unit (embeddings, time embedding, head) is gathered for them as for ``forward``. The pipelined
  step keeps a stage's DP x CP ranks in step as ``LockstepNet`` does at PP 1 (forward-only sweeps
  leave the units gathered, ``training/pipeline_step.stage_forward``) and reduce-scatters each
  unit's gradients once, at the 1F1B pass's last backward (``set_gradient_sync``).
- The tangent pass: ``forward_with_tangent`` is registered with ``register_fsdp_forward_method``,
  so it gathers (and reshards) parameters exactly as ``forward``; it runs without a graph.

Units: one per transformer block (its parameters are gathered for the block and freed after it,
the next one prefetched) and the root. Mixed precision: bf16 compute, fp32 sharded parameters,
fp32 gradient reduction (``MixedPrecisionPolicy``); the teacher, frozen, is kept in its own dtype.

The trainer (``--use-torch-fsdp2``, Megatron-LM's name; the planner also reads
``--data-parallel-sharding-strategy optim_grads_params``): ``training/model_building.py`` shards
the frozen teacher with ``shard_model``; ``training/fsdp_backend.py`` (``FSDPDataParallel``) shards
the student and fake score and steps AdamW on the DTensor shards, its ``LockstepNet`` keeps the
ranks' gathers in step through rollouts of different lengths; the power EMA's shadow is the
student's DTensor shards; checkpoints go through megatron-core dist_checkpointing like every other
backend's (``checkpointing/sharded_state.py`` writes each DTensor shard as its rows of the global
tensor), so they reshard to any layout and backend. ``FSDPTrainedModel`` and ``save_checkpoint`` /
``load_checkpoint`` (torch.distributed.checkpoint) below are the standalone form the unit tests use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

FORWARD_METHODS = ("forward_with_tangent",)
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
    attrs = parallel_attributes(model)
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in model.blocks.values():
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    for method in FORWARD_METHODS + stage_entry_methods(model):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    # Losses are sums over samples divided by the global batch: gradients add over DP x CP
    # (every unit's reduce-scatter; the setting is per unit). A plain SUM: for fp32 / bf16 FSDP2
    # would otherwise use PREMUL_SUM(1), which gloo does not have.
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    restore_parallel_attributes(model, attrs)
    return model


def stage_entry_methods(model: nn.Module) -> tuple[str, ...]:
    """The root-unit methods the pipeline schedule calls on this stage from outside (none on a whole
    model: ``forward`` calls them). Only the outermost: a registered method called from inside
    another (``embed`` calls ``time_conditioning``) would reshard the root when the outer one ends,
    so the DP ranks' forward-only calls would gather it again, a different number of times."""
    first, last = getattr(model, "pre_process", True), getattr(model, "post_process", True)
    if first and last:
        return ()
    return ("embed" if first else "time_conditioning",) + (("head",) if last else ())


def set_reshard_after_forward(model: nn.Module, reshard: bool) -> None:
    """Whether ``model``'s units free their gathered parameters after each forward (False: they
    stay gathered until ``reshard_all`` or a backward). The root unit keeps FSDP2's setting when
    True (not resharded: the backward needs it first)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule) and not (reshard and unit is model):
            unit.set_reshard_after_forward(reshard, recurse=False)


def set_gradient_sync(model: nn.Module, last: bool) -> None:
    """Before one backward of a step's several (the pipelined 1F1B pass's items): reduce-scatter
    the gradients only on the ``last`` one. The earlier ones accumulate unsharded gradients in
    each unit (FSDP2's ``set_requires_gradient_sync(False)``, its no_sync; ``set_is_last_backward``
    tells it which backward finishes the step). No-op for an unsharded model. Every DP x CP rank
    of a stage runs the same items, so every rank reduces at the same backward."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        model.set_is_last_backward(last)


def reshard_all(model: nn.Module | None) -> None:
    """Free every gathered unit of a sharded model (no-op for an unsharded one or None)."""
    from torch.distributed.fsdp import FSDPModule

    if model is None:
        return
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def parallel_attributes(model: nn.Module) -> dict[str, dict]:
    """The tensor-parallel attributes of every parameter (``tp_split_dim`` ...), by name."""
    return {name: {a: getattr(p, a) for a in _PARALLEL_ATTRIBUTES if hasattr(p, a)}
            for name, p in model.named_parameters()}


def restore_parallel_attributes(model: nn.Module, attrs: dict[str, dict]) -> None:
    """Put them back on parameters that were replaced (by sharding, or ``to_empty``)."""
    for name, p in model.named_parameters():
        for a, v in attrs.get(name, {}).items():
            setattr(p, a, v)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (DTensor) parameter or gradient; plain tensors unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_square_sum(params, group) -> torch.Tensor:
    """Sum of the squared gradient entries of ``params`` (fp64, on the CPU) over the whole model:
    local shards summed over the shard ``group``, and TP-split parameters' slices also over the
    tensor-parallel group (replicated ones counted once). Parameters without a gradient count 0."""
    from . import state as pstate

    split, rest = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        sq = local_tensor(p.grad).detach().double().pow(2).sum().cpu()
        if getattr(p, "tp_split_dim", None) is not None:
            split += sq
        else:
            rest += sq
    both = torch.stack([split, rest])
    if group is not None and dist.get_world_size(group) > 1:
        both = _all_reduce(both, group)
    tp = pstate.tensor_parallel_group()
    if tp is not None and dist.get_world_size(tp) > 1:  # TP-split squares from every TP rank
        both[0] = _all_reduce(both[:1].clone(), tp)[0]
    return both.sum()


def clip_grads_with_norm_(params, clip: float, norm: float) -> None:
    """Scale each rank's local shard of ``params``' gradients by min(1, clip / (norm + 1e-6)), the
    coefficient of torch's ``clip_grads_with_norm_``; ``norm`` is already reduced over every group,
    so all ranks scale alike. The FSDP trainers' one clipping rule."""
    coef = min(1.0, clip / (norm + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                local_tensor(p.grad).mul_(coef)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded (TP-local) parameters of a sharded model, on every rank (collective)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


class FSDPTrainedModel:
    """A trained model (student or fake score) sharded by FSDP2: the backend shape the trainer's
    ``MegatronDP`` has (``net``, ``zero_grad``, ``accumulate``, ``step`` -> (stepped, grad_norm),
    ``lr``), plus checkpoint state through torch.distributed.checkpoint.

    AdamW runs on the DTensor shards (each rank steps its 1/n of every parameter: the optimizer
    state is sharded with the parameters). The gradient norm counts every parameter once: the
    shards' squares summed over DP x CP, TP-split parameters' over TP, and (under PP) the stages'.
    """

    def __init__(self, module: nn.Module, *, lr: float, betas, eps: float, weight_decay: float,
                 clip_grad: float | None = None, param_dtype: torch.dtype | None = None,
                 cpu_offload: bool = False, mesh=None):
        self.module = shard_model(module, mesh=mesh, param_dtype=param_dtype, cpu_offload=cpu_offload)
        self.net = self.module
        self.clip_grad = clip_grad
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=lr,
                                           betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def accumulate(self):
        """Context for one micro-batch: FSDP2 reduce-scatters each backward's gradients into the
        sharded ``.grad`` as it goes (accumulating), so nothing is deferred here."""
        import contextlib

        return contextlib.nullcontext()

    def grad_norm(self) -> torch.Tensor:
        return grad_square_sum(self.module.parameters(), shard_group()).sqrt()

    def step(self) -> tuple[bool, float]:
        norm = float(self.grad_norm())
        if not torch.isfinite(torch.tensor(norm)):
            return False, norm
        if self.clip_grad:
            clip_grads_with_norm_(self.module.parameters(), self.clip_grad, norm)
        self.optimizer.step()
        return True, norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """Model and optimizer state as DTensors keyed by parameter name (torch.distributed.checkpoint
        reshards them on load: another DP x CP size, or an unsharded model)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else t.device
    out = t.to(device)
    dist.all_reduce(out, group=group)
    return out.to(t.device)


def save_checkpoint(path: str, trained: dict[str, "FSDPTrainedModel"]) -> None:
    """Write every model's sharded state with torch.distributed.checkpoint (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({name: m.state_dict() for name, m in trained.items()}, checkpoint_id=path)


def load_checkpoint(path: str, trained: dict[str, "FSDPTrainedModel"]) -> None:
    """Load a ``save_checkpoint`` directory written at any DP x CP size into these models."""
    import torch.distributed.checkpoint as dcp

    state = {name: m.state_dict() for name, m in trained.items()}
    dcp.load(state, checkpoint_id=path)
    for name, m in trained.items():
        m.load_state_dict(state[name])
