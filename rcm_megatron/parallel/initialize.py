"""Start torch.distributed and megatron-core's process groups for a ParallelConfig.

Works under torchrun (env:// rendezvous) with NCCL on GPU and gloo on CPU; a plain
single process without torchrun's variables stays undistributed (every group None).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from . import state
from .config import ParallelConfig


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def initialize_distributed(cfg: ParallelConfig) -> None:
    """Initialize the default process group and megatron-core model-parallel groups; a collective
    that waits longer than ``--distributed-timeout-minutes`` aborts the job (NCCL watchdog)."""
    timeout = datetime.timedelta(minutes=cfg.distributed_timeout_minutes)
    backend = cfg.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not launched_by_torchrun():
        if cfg.model_parallel_size > 1:
            raise ValueError(f"model-parallel size {cfg.model_parallel_size} needs a distributed launch "
                             "(torchrun --nproc-per-node N ...)")
        if not dist.is_initialized():
            # A single process still gets a (world size 1) process group, so checkpointing and
            # every other code path is the one a torchrun launch takes.
            if backend == "nccl":
                torch.cuda.set_device(0)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    elif not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=timeout)
    cfg.data_parallel_size(dist.get_world_size())  # validates divisibility with a clear message
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            context_parallel_size=cfg.context_parallel_size,
            hierarchical_context_parallel_sizes=cfg.hierarchical_context_parallel_sizes,
            order="tp-cp-ep-dp-pp",  # expert parallel size 1: the tp-cp-dp-pp order of docs/design.md §5
            distributed_timeout_minutes=cfg.distributed_timeout_minutes,
        )
    state.set_sequence_parallel(cfg.sequence_parallel)
    state.set_context_parallel_comm_type(cfg.cp_comm_type)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    state.set_sequence_parallel(False)
    state.set_context_parallel_comm_type("p2p")
