"""GPU data parallelism through megatron-core: DistributedDataParallel + distributed optimizer.

The same semantics as the CPU path of the trainer (gradients *summed* over DP x CP, since
every loss is already divided by the global batch; AdamW with the method's betas; a step
is skipped when the gradient norm is not finite), with megatron-core doing the work:
contiguous grad buffers, bucketed reduce-scatter (optionally overlapped with backward),
fp32 main parameters sharded over DP, parameter all-gather after the step (optionally
overlapped), optimizer CPU offload where megatron-core offers it. Weight decay applies to
every parameter, as on the CPU path (megatron-core's default would skip biases and norms).

Under pipeline parallelism every stage holds the time embedding; its gradient covers only
the stage's own blocks, so after the DP x CP reduction it is summed over the stages with
megatron-core's conditional-embedder reduction (the one its DiT models use), and it counts
once in the gradient norm (``shared`` on all stages but the first).

``MegatronDP`` is the ``TrainedModel`` backend of ``--use-distributed-optimizer``
(``trained_model.py``); ``net`` is what the rCM step functions receive: calls go through the
DDP wrapper (gradient hooks), tangent passes straight to the module (no graph, nothing to
reduce). What megatron-core 0.16.1 gets wrong for our models is fixed in ``megatron_compat.py``,
behind its version check.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..checkpointing.sharded_state import model_sharded_state_dict
from ..models.config import WanConfig
from ..parallel.config import ParallelConfig
from . import megatron_compat as compat
from .trained_model import TrainedModel


class _Net:
    """VelocityNet view of a DDP-wrapped WanDiT."""

    def __init__(self, ddp):
        self.ddp, self.module = ddp, ddp.module

    def __call__(self, latents, timestep, context):
        return self.ddp(latents, timestep, context)

    def forward_with_tangent(self, *args, **kwargs):
        return self.module.forward_with_tangent(*args, **kwargs)

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    @property
    def dtype(self):
        return next(self.module.parameters()).dtype


def transformer_config(cfg: WanConfig, par: ParallelConfig, bf16: bool):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=par.tensor_model_parallel_size, sequence_parallel=par.sequence_parallel,
        context_parallel_size=par.context_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        calculate_per_token_loss=True,  # gradients are summed, not averaged, over DP x CP
    )


class MegatronDP(TrainedModel):
    optimizer_format = "megatron-distributed"

    def __init__(self, module, cfg: WanConfig, par: ParallelConfig, *, lr: float, betas, eps: float,
                 weight_decay: float, clip_grad: float | None, bf16: bool, overlap_grad_reduce: bool,
                 overlap_param_gather: bool, cpu_offload: bool, min_lr: float | None = None,
                 pipeline_first_stage: bool = True):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        compat.check_version()
        tcfg = transformer_config(cfg, par, bf16)
        self.pipelined = par.pipeline_model_parallel_size > 1
        if self.pipelined:
            compat.mark_pipeline_replicated(module, tcfg, pipeline_first_stage)
        self.tcfg = tcfg
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather, use_distributed_optimizer=True)
        self.ddp = DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=module)
        self.ddp.broadcast_params()
        ocfg = OptimizerConfig(
            optimizer="adam", lr=lr, min_lr=lr if min_lr is None else min_lr, weight_decay=weight_decay,
            adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=eps, bf16=bf16, params_dtype=tcfg.params_dtype,
            use_distributed_optimizer=True, overlap_param_gather=overlap_param_gather, clip_grad=clip_grad or 0.0,
            optimizer_cpu_offload=cpu_offload, optimizer_offload_fraction=1.0 if cpu_offload else 0.0)
        if cpu_offload:
            compat.precision_aware_for_offload(ocfg)
        with compat.leaf_fp32_shards() if cpu_offload else contextlib.nullcontext():
            optimizer = get_megatron_optimizer(ocfg, [self.ddp], config_overrides={})
        compat.fix_param_group_order(optimizer)
        if cpu_offload:
            compat.load_fp32_params_in_hybrid(optimizer)
        super().__init__(module, optimizer, net=_Net(self.ddp))

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def accumulate(self):
        """Context for a micro-batch's backward passes. An rCM student step runs several backward
        passes per micro-batch (sCM, DMD), so bucket hooks must not fire mid-step: gradients
        accumulate in the buffers and are reduced once, in ``step``."""
        return self.ddp.no_sync()

    def step(self) -> tuple[bool, float]:
        """Reduce gradients over DP x CP and step; returns (stepped, grad_norm)."""
        if self.ddp.ddp_config.overlap_grad_reduce:
            self.ddp.start_grad_sync()
        self.ddp.finish_grad_sync()
        if self.pipelined:
            compat.allreduce_pipeline_replicated_grads(self.ddp, self.tcfg)
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if found_inf or not math.isfinite(grad_norm):
            self.zero_grad()
            return False, grad_norm
        if self.optimizer.config.clip_grad > 0:
            self.optimizer.clip_grad_norm(self.optimizer.config.clip_grad)
        self.optimizer.step_with_ready_grads()
        return True, grad_norm

    def optimizer_sharded_state_dict(self, prefix: str, is_loading: bool = False) -> dict:
        """megatron-core's sharded optimizer state in its ``fully_reshardable`` layout (per-parameter
        tensors gathered over DP; its ``fully_sharded_model_space`` layout requires 3-part replica
        ids, ours have 4: PP, TP, CP, DP)."""
        compat.ensure_optimizer_state(self.optimizer)
        return self.optimizer.sharded_state_dict(model_sharded_state_dict(self.module, prefix), is_loading=is_loading,
                                                 metadata={"distrib_optim_sharding_type": "fully_reshardable"})

    def load_optimizer_state_dict(self, loaded: dict) -> None:
        with compat.tolerate_missing_adam_step(self.optimizer):
            self.optimizer.load_state_dict(loaded)
        compat.unshare_adam_steps(self.optimizer)


def optimizer_state_bytes(dp: MegatronDP, device_type: str | None = None) -> int:
    """Bytes of optimizer state (fp32 main params + moments) held by this rank (on
    ``device_type`` only, when given: 'cuda' vs 'cpu' under optimizer CPU offload)."""
    total = 0
    for opt in compat.inner_optimizers(dp.optimizer):
        inner = opt.optimizer
        # Under CPU offload the group's params are views of the model's bf16 weights, and the fp32
        # main params live in the state ("master_param"), on the host.
        offloaded = compat.is_hybrid(inner)
        for group in inner.param_groups:
            for p in group["params"]:
                for v in (*(() if offloaded else (p,)), *inner.state.get(p, {}).values()):
                    if torch.is_tensor(v) and (device_type is None or v.device.type == device_type):
                        total += v.numel() * v.element_size()
    return total
