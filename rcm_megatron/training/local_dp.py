"""The local data-parallel backend of ``TrainedModel``: torch AdamW on every rank's full copy
of its stage, gradients all-reduced over DP x CP with torch.distributed (the CPU path, and the
GPU path without ``--use-distributed-optimizer``).

Gradients are *summed* over DP x CP (every loss is already divided by the global batch), the
time embedding's also over the pipeline stages (each covers only its own blocks). The norm
is global: squares of TP-sharded gradients summed over TP, replicated ones counted once,
pipeline-replicated ones on the first stage only, squares summed over the stages. It is a sum
of squares, not torch's ``get_total_norm`` (a norm of per-tensor norms), because the partial
sums travel between process groups before the square root; clipping is torch's
``clip_grads_with_norm_`` with that norm, so every rank scales its shards alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel import state as pstate
from . import pipeline_step
from ..checkpointing import sharded_state as ss
from .trained_model import OptimizerSettings, TrainedModel


class LocalDataParallel(TrainedModel):
    optimizer_format = "torch-adamw"

    def __init__(self, module, opt: OptimizerSettings, *, grad_group, pipe):
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=opt.lr,
                                      betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        super().__init__(module, optimizer)
        self.clip_grad, self.grad_group, self.pipe = opt.clip_grad, grad_group, pipe
        self.device = next(module.parameters()).device

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> tuple[bool, float]:
        grad_norm = self._reduce_and_norm()
        stepped = bool(torch.isfinite(grad_norm))
        if stepped:
            if self.clip_grad is not None:
                torch.nn.utils.clip_grads_with_norm_(self._trainable(), self.clip_grad, grad_norm)
            self.optimizer.step()
        else:
            self.zero_grad()
        return stepped, float(grad_norm)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _reduce_and_norm(self) -> torch.Tensor:
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        for _, p in named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.grad_group is not None:
                dist.all_reduce(p.grad, group=self.grad_group)
        pipeline_step.all_reduce_replicated_grads(self.module, self.pipe)
        params = [p for n, p in named if self.pipe.is_first or not pipeline_step.is_pipeline_replicated(n)]
        sharded = sum((p.grad.detach().float().pow(2).sum() for p in params
                       if getattr(p, "tp_split_dim", None) is not None), torch.zeros(()))
        rest = sum((p.grad.detach().float().pow(2).sum() for p in params
                    if getattr(p, "tp_split_dim", None) is None), torch.zeros(()))
        tp_group = pstate.tensor_parallel_group()
        if tp_group is not None and dist.get_world_size(tp_group) > 1:  # other shards' squares; replicated once
            sharded = sharded.to(self.device)
            dist.all_reduce(sharded, group=tp_group)
        total = sharded.cpu() + rest.cpu()
        if self.pipe.size > 1:
            comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            total = self.pipe.all_reduce(total.to(comm_device)).cpu()
        return total.sqrt()

    def optimizer_sharded_state_dict(self, prefix: str, is_loading: bool = False) -> dict:
        sd = ss.optimizer_sharded_state_dict(self.optimizer, self.module, f"opt_{prefix}")
        if self.pipe.size > 1:
            # Step counts are common state, which every rank must hold alike (rank 0 writes it):
            # every stage contributes its parameters' counts.
            parts = [None] * self.pipe.size
            dist.all_gather_object(parts, sd["steps"], group=self.pipe.group)
            sd["steps"] = {name: step for part in parts for name, step in part.items()}
        return sd

    def load_optimizer_state_dict(self, loaded: dict) -> None:
        ss.load_optimizer_state(self.optimizer, self.module, loaded)
