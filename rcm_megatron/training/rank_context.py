"""This rank's place in the run: distributed init, its DP / DP x CP / pipeline groups, the batch
split, and the collectives the loop needs (decisions every rank takes alike, logged totals).

One object instead of a dozen trainer attributes, so the loop reads ``ctx.dp_rank``,
``ctx.agree(flag)``, ``ctx.reduce_totals(totals)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.config import ParallelConfig
from ..parallel.initialize import initialize_distributed, rank as global_rank, world_size
from ..parallel.pipeline import PipelineLayout, StageLink


@dataclass
class RankContext:
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    dp_group: object
    dp_cp_group: object  # gradients are reduced and the EMA is sharded over DP x CP
    global_batch: int
    num_micro: int  # micro-batches per iteration on this DP rank
    pipe: PipelineLayout
    link: StageLink
    device: torch.device

    @classmethod
    def initialize(cls, par: ParallelConfig, device: torch.device) -> "RankContext":
        """Start torch.distributed and megatron-core's groups for ``par`` (see parallel/initialize.py)."""
        from megatron.core import parallel_state as mpu

        initialize_distributed(par)
        grad_group = mpu.get_data_parallel_group(with_context_parallel=True)
        global_batch, num_micro = par.resolve_batch(world_size())
        pipe = PipelineLayout.current()
        return cls(rank=global_rank(), world_size=world_size(), dp_rank=mpu.get_data_parallel_rank(),
                   dp_size=mpu.get_data_parallel_world_size(), dp_group=mpu.get_data_parallel_group(),
                   dp_cp_group=grad_group,
                   global_batch=global_batch, num_micro=num_micro, pipe=pipe, link=StageLink(pipe, device),
                   device=device)

    @property
    def grad_group(self):
        """DP x CP, None when this rank is alone in it (nothing to reduce)."""
        return self.dp_cp_group if dist.get_world_size(self.dp_cp_group) > 1 else None

    def comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def agree(self, flag: bool) -> bool:
        """All ranks take the same decision (any rank's flag)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def reduce_totals(self, totals: dict) -> dict:
        """Sum over DP ranks; under PP every stage takes the last stage's values (only it has the losses)."""
        if self.dp_size == 1 and self.pipe.size == 1:
            return totals
        keys = sorted(totals)
        buf = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.comm_device())
        if self.dp_size > 1:
            dist.all_reduce(buf, group=self.dp_group)
        self.pipe.broadcast_from_last(buf)
        return dict(zip(keys, buf.cpu().tolist()))
