"""Process groups, taken from ``megatron.core.parallel_state`` when it is initialized.

Model code asks here for its groups and never touches torch.distributed itself. With no
initialized model parallelism every group is None and every size is 1, which is the
single-process case the float64 oracle runs.

Sequence parallelism (Megatron's ``--sequence-parallel``) and the context-parallel
communication type (``--cp-comm-type``) are switches kept here, set by
``initialize_distributed`` from the ParallelConfig; the model reads them at every forward.
"""

from __future__ import annotations

import torch.distributed as dist


def _mpu():
    """megatron.core.parallel_state if model parallelism is initialized, else None.

    Model parallelism always starts with torch.distributed, so a single process that never
    initialized it does not pay for importing megatron-core here.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state

    return parallel_state if parallel_state.model_parallel_is_initialized() else None


def tensor_parallel_group():
    mpu = _mpu()
    return mpu.get_tensor_model_parallel_group() if mpu else None


def tensor_parallel_world_size() -> int:
    group = tensor_parallel_group()
    return dist.get_world_size(group) if group is not None else 1


def tensor_parallel_rank() -> int:
    group = tensor_parallel_group()
    return dist.get_rank(group) if group is not None else 0


_SEQUENCE_PARALLEL = False


def set_sequence_parallel(enabled: bool) -> None:
    """Turn sequence parallelism on or off (``initialize_distributed`` calls this)."""
    global _SEQUENCE_PARALLEL
    _SEQUENCE_PARALLEL = bool(enabled)


def sequence_parallel_enabled() -> bool:
    """True when token streams are sharded along the sequence over the TP group (needs TP > 1)."""
    return _SEQUENCE_PARALLEL and tensor_parallel_world_size() > 1


# ------------------------------------------------------------------ context parallelism


def context_parallel_group():
    mpu = _mpu()
    return mpu.get_context_parallel_group() if mpu else None


def context_parallel_world_size() -> int:
    group = context_parallel_group()
    return dist.get_world_size(group) if group is not None else 1


def context_parallel_rank() -> int:
    group = context_parallel_group()
    return dist.get_rank(group) if group is not None else 0


def hierarchical_context_parallel_groups():
    """(inner all-to-all group, outer ring group) of ``--hierarchical-context-parallel-sizes A B``,
    or None when megatron-core made none. Inner groups hold A consecutive CP ranks, outer
    groups every A-th one, so CP rank = outer rank * A + inner rank."""
    mpu = _mpu()
    if mpu is None:
        return None
    groups = mpu.get_hierarchical_context_parallel_groups(check_initialized=False)
    return tuple(groups) if groups else None


_CP_COMM_TYPE = "p2p"


def set_context_parallel_comm_type(comm_type: str) -> None:
    """``a2a``, ``p2p`` or ``a2a+p2p`` (``initialize_distributed`` calls this)."""
    global _CP_COMM_TYPE
    from .config import CP_COMM_TYPES

    if comm_type not in CP_COMM_TYPES:
        raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES}, got {comm_type!r}")
    _CP_COMM_TYPE = comm_type


def context_parallel_comm_type() -> str:
    return _CP_COMM_TYPE
