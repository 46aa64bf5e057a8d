"""Parallel layout, one validated dataclass with Megatron-LM flag names."""

from __future__ import annotations

from dataclasses import dataclass

CP_COMM_TYPES = ("a2a", "p2p", "a2a+p2p")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    cp_comm_type: str = "p2p"
    hierarchical_context_parallel_sizes: list[int] | None = None
    pipeline_model_parallel_size: int = 1
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    distributed_backend: str | None = None  # None: nccl on CUDA, gloo otherwise
    distributed_timeout_minutes: int = 10  # Megatron-LM's default: a stuck collective aborts, not hangs

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size",
                     "micro_batch_size", "distributed_timeout_minutes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES}, got {self.cp_comm_type!r}")
        self._check_hierarchical_cp()
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # Megatron-LM does the same: SP is meaningless at TP = 1

    def _check_hierarchical_cp(self):
        sizes = self.hierarchical_context_parallel_sizes
        if sizes is not None:
            sizes = [int(s) for s in sizes]
            if len(sizes) != 2 or min(sizes) < 1:
                raise ValueError(f"--hierarchical-context-parallel-sizes takes two positive integers A B "
                                 f"(all-to-all inside groups of A ranks, ring across B), got {sizes}")
            if self.cp_comm_type != "a2a+p2p":
                raise ValueError(f"--hierarchical-context-parallel-sizes is used only with --cp-comm-type "
                                 f"a2a+p2p, not {self.cp_comm_type}")
            if sizes[0] * sizes[1] != self.context_parallel_size:
                raise ValueError(f"--hierarchical-context-parallel-sizes {sizes[0]} {sizes[1]} must multiply to "
                                 f"--context-parallel-size {self.context_parallel_size}")
            self.hierarchical_context_parallel_sizes = sizes
        elif self.cp_comm_type == "a2a+p2p" and self.context_parallel_size > 1:
            raise ValueError(f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A B with "
                             f"A x B = --context-parallel-size {self.context_parallel_size} (all-to-all inside "
                             "groups of A ranks, ring across B)")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor ({self.tensor_model_parallel_size}) x "
                f"context ({self.context_parallel_size}) x pipeline ({self.pipeline_model_parallel_size}) "
                f"parallel sizes = {self.model_parallel_size}")
        return world_size // self.model_parallel_size

    def resolve_batch(self, world_size: int) -> tuple[int, int]:
        """(global batch, number of micro-batches per DP rank); checks divisibility."""
        dp = self.data_parallel_size(world_size)
        gbs = self.global_batch_size if self.global_batch_size is not None else self.micro_batch_size * dp
        if gbs < 1 or gbs % (self.micro_batch_size * dp):
            raise ValueError(
                f"--global-batch-size {gbs} must be a positive multiple of --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {dp} = {self.micro_batch_size * dp}")
        return gbs, gbs // (self.micro_batch_size * dp)
