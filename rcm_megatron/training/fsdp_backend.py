"""The ZeRO-3 backend of ``TrainedModel`` (``--use-torch-fsdp2``): the student or fake score
sharded by torch FSDP2 over DP x CP (``parallel/fsdp.py`` says which library and why), AdamW
on the DTensor shards, so parameters, gradients and optimizer state are all 1/n per rank.

Semantics as the other backends: gradients are *summed* over DP x CP (FSDP2's reduce-scatter,
divide factor 1; each backward reduce-scatters and accumulates into the sharded ``.grad``, so
an rCM step's several backward passes per micro-batch need nothing deferred), the pipeline-
replicated time embedding's gradient is summed over the stages (on the local shards: every
stage shards it alike over the same DP x CP positions), and the norm counts every parameter
once (shards' squares summed over DP x CP, TP-split ones over TP, first stage only for the
replicated ones, over the stages). A non-finite norm skips the step.

Checkpoints: the optimizer state is the local backend's layout (``torch-adamw``: per-parameter
moments keyed by the global name, step counts as common state), written through
``checkpointing.sharded_state``, which turns every DTensor shard into its piece of the global
tensor; so a ZeRO-3 checkpoint resumes at any layout, with or without ``--use-torch-fsdp2``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel import fsdp
from . import pipeline_step
from .local_dp import LocalDataParallel
from .trained_model import OptimizerSettings


class LockstepNet:
    """VelocityNet view of a sharded model that keeps the DP x CP ranks' collectives in step.

    Every FSDP2 unit all-gathers in each forward, so every rank of the shard group must run the
    same number of forwards. The rCM student rollout does not: its step count is drawn per
    sample (``rcm.rollout``), and DP ranks hold different samples. So a call without grad
    (rollout, tangent pass) leaves the units gathered: each rank gathers once, on its first
    call, and its later no-grad calls need no collective. A call with grad reshards after its
    forward as usual (the backward gathers again, on every rank alike). ``fsdp.reshard_all``
    frees what is left gathered at the end of the iteration. Cost: the model's compute-dtype
    weights stay whole through the forward-only half of a step.

    Under pipeline parallelism the pipelined step calls the stage modules directly; its
    ``stage_forward`` sets the same mode per call (``training/pipeline_step.py``)."""

    def __init__(self, module):
        self.module = module
        self.dtype = pipeline_step.model_dtype(module)

    def _set_mode(self) -> None:
        fsdp.set_reshard_after_forward(self.module, torch.is_grad_enabled())

    def __call__(self, *args, **kwargs):
        self._set_mode()
        return self.module(*args, **kwargs)

    def forward_with_tangent(self, *args, **kwargs):
        fsdp.set_reshard_after_forward(self.module, False)  # no graph: always forward-only
        return self.module.forward_with_tangent(*args, **kwargs)

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()


class FSDPDataParallel(LocalDataParallel):
    optimizer_format = "torch-adamw"  # same per-parameter state as LocalDataParallel: checkpoints interchange

    def __init__(self, module, opt: OptimizerSettings, *, pipe, param_dtype: torch.dtype | None = None,
                 cpu_offload: bool = False):
        fsdp.shard_model(module, param_dtype=param_dtype, cpu_offload=cpu_offload)
        super().__init__(module, opt, grad_group=None, pipe=pipe)  # FSDP2 reduces; nothing left to all-reduce
        self.shard_group = fsdp.shard_group()
        self.net = LockstepNet(module)

    def step(self) -> tuple[bool, float]:
        grad_norm = self._reduce_and_norm()
        stepped = bool(torch.isfinite(grad_norm))
        if not stepped:
            self.zero_grad()
            return False, float(grad_norm)
        if self.clip_grad is not None:
            fsdp.clip_grads_with_norm_(self._trainable(), self.clip_grad, float(grad_norm))
        self.optimizer.step()
        return True, float(grad_norm)

    def _reduce_and_norm(self) -> torch.Tensor:
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        for _, p in named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.pipe.size > 1:
            for n, p in named:
                if pipeline_step.is_pipeline_replicated(n):
                    grad = fsdp.local_tensor(p.grad)
                    reduced = self.pipe.all_reduce(grad.to(self._comm_device()))
                    grad.copy_(reduced)
        counted = [p for n, p in named if self.pipe.is_first or not pipeline_step.is_pipeline_replicated(n)]
        total = fsdp.grad_square_sum(counted, self.shard_group)
        if self.pipe.size > 1:
            total = self._all_reduce(total.reshape(1), self.pipe.group)[0]
        return total.sqrt()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def _all_reduce(self, t: torch.Tensor, group) -> torch.Tensor:
        out = t.to(self._comm_device())
        dist.all_reduce(out, group=group)
        return out.cpu()
