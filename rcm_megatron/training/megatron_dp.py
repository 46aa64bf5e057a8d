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

``MegatronDP`` wraps one trained model (student or fake score); ``net`` is what the rCM
step functions receive: calls go through the DDP wrapper (gradient hooks), tangent passes
straight to the module (no graph, nothing to reduce).
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..checkpointing.sharded_state import PIPELINE_REPLICATED, ensure_adam_state
from ..models.config import WanConfig
from ..parallel.config import ParallelConfig


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


class MegatronDP:
    def __init__(self, module, cfg: WanConfig, par: ParallelConfig, *, lr: float, betas, eps: float,
                 weight_decay: float, clip_grad: float | None, bf16: bool, overlap_grad_reduce: bool,
                 overlap_param_gather: bool, cpu_offload: bool, min_lr: float | None = None,
                 pipeline_first_stage: bool = True):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        tcfg = transformer_config(cfg, par, bf16)
        self.pipelined = par.pipeline_model_parallel_size > 1
        if self.pipelined:
            tcfg.has_cond_embedder = True
            for name, p in module.named_parameters():
                if name.startswith(PIPELINE_REPLICATED):
                    p.pipeline_parallel = True  # summed over the stages after the DP reduction
                    p.shared = not pipeline_first_stage  # counted once in the gradient norm
                    # Its own grad-buffer bucket, so every stage shards it over DP alike: the stage
                    # sum above adds the DP-reduced shards of the *same* elements (otherwise each
                    # stage stepped its copy with a different gradient; found on 4 H100s).
                    p.shared_embedding = True
        self.tcfg = tcfg
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather, use_distributed_optimizer=True)
        self.ddp = DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=module)
        self.ddp.broadcast_params()
        ocfg = OptimizerConfig(
            optimizer="adam", lr=lr, min_lr=lr if min_lr is None else min_lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
            adam_eps=eps, bf16=bf16, params_dtype=tcfg.params_dtype, use_distributed_optimizer=True,
            overlap_param_gather=overlap_param_gather, clip_grad=clip_grad or 0.0,
            optimizer_cpu_offload=cpu_offload, optimizer_offload_fraction=1.0 if cpu_offload else 0.0)
        if cpu_offload:
            _precision_aware_for_offload(ocfg)
        with _leaf_fp32_shards() if cpu_offload else contextlib.nullcontext():
            self.optimizer = get_megatron_optimizer(ocfg, [self.ddp], config_overrides={})
        _fix_param_group_order(self.optimizer)
        if cpu_offload:
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                _load_fp32_params_in_hybrid(opt.optimizer)
        self.net = _Net(self.ddp)
        self.module = module

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
            from megatron.core.distributed.finalize_model_grads import _allreduce_conditional_embedding_grads

            _allreduce_conditional_embedding_grads([self.ddp], self.tcfg)
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if found_inf or not math.isfinite(grad_norm):
            return False, grad_norm
        if self.optimizer.config.clip_grad > 0:
            self.optimizer.clip_grad_norm(self.optimizer.config.clip_grad)
        self.optimizer.step_with_ready_grads()
        return True, grad_norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _ensure_state(self) -> None:
        """Materialize AdamW state (zeros, step 0) so a fresh optimizer has tensors to load into.

        megatron-core's DistributedOptimizer.state_dict() reads every parameter's ``step``
        when neither Apex nor Transformer Engine is installed; before the first step there is
        none, so loading a checkpoint into a fresh run needs this (found on 2 H100s).
        """
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            if hasattr(inner, "sub_optimizers"):  # CPU offload: the hybrid device optimizer
                if len(inner.state) == 0:
                    _zero_hybrid_state(inner)
            else:
                ensure_adam_state(inner)

    def sharded_state_dict(self, model_sharded: dict, is_loading: bool = False) -> dict:
        """megatron-core's sharded optimizer state in its ``fully_reshardable`` layout (per-parameter
        tensors gathered over DP; its ``fully_sharded_model_space`` layout requires 3-part replica
        ids, ours have 4: PP, TP, CP, DP)."""
        self._ensure_state()
        return self.optimizer.sharded_state_dict(model_sharded, is_loading=is_loading,
                                                 metadata={"distrib_optim_sharding_type": "fully_reshardable"})

    def load_state_dict(self, loaded: dict) -> None:
        with _tolerate_missing_adam_step(self.optimizer):
            self.optimizer.load_state_dict(loaded)
        self._unshare_steps()

    def _unshare_steps(self) -> None:
        """megatron-core 0.16.1 (no Apex/TE) gives every parameter's state the *same* ``step``
        tensor on load; torch's Adam increments each parameter's step in place, so the shared
        one would count once per parameter and wreck the bias correction after a resume (seen
        on 2 H100s: resumed losses drifted from the first step on). One tensor per parameter."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for st in opt.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()


_HALF = ("torch.cuda.HalfTensor", "torch.cuda.BFloat16Tensor")


def _fix_param_group_order(optimizer) -> None:
    """Work around megatron-core 0.16.1 with mixed-dtype models (ours keeps the time embedding,
    modulation tables and norms in fp32, as Wan does): the inner optimizer's groups hold the fp32
    parameters' shards first, then the bf16 ones, but ``model_param_group_index_map`` numbers
    them in grad-buffer order, which puts bf16 first whenever the module's first parameter is
    bf16 (a pipeline stage other than the last). Checkpoints then read and wrote another
    parameter's optimizer state (found on 4 H100s: size mismatch at the first PP2 save, and a
    silent mix-up wherever sizes agree). Renumbered here to the inner optimizer's order, and
    checked element counts against the grad-buffer ranges."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "opt_group_ranges"):
            continue
        for g, group_range in enumerate(opt.opt_group_ranges):
            params = group_range["params"]
            ordered = [p for p in params if p.type() not in _HALF] + [p for p in params if p.type() in _HALF]
            for order, p in enumerate(ordered):
                opt.model_param_group_index_map[p] = (g, order)
        for p, (g, order) in opt.model_param_group_index_map.items():
            inner = opt.optimizer.param_groups[g]["params"][order]
            rng = opt._get_model_param_range_map(p)["param"]
            if inner.numel() != rng.size:
                raise RuntimeError(f"distributed optimizer: parameter of shape {tuple(p.shape)} maps to an optimizer "
                                   f"tensor of {inner.numel()} elements, its shard has {rng.size}")


@contextlib.contextmanager
def _leaf_fp32_shards():
    """Work around megatron-core 0.16.1's CPU offload with fp32 model parameters: on the
    precision-aware path their shards are views of parameters that require grad (non-leaf), and
    the hybrid device optimizer's constructor refuses them ("can't optimize a non-leaf Tensor",
    found on 2 H100s). Detached views share the storage, keep the attributes, and replace the
    originals both in the optimizer groups and where gradients are attached."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]

    def build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        out = orig.__func__(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        for group, group_range in zip(out[3], opt_group_ranges):  # shard_fp32_groups
            swap = {}
            for i, shard in enumerate(group):
                if not shard.is_leaf:
                    leaf = shard.detach()
                    leaf.__dict__.update(shard.__dict__)
                    group[i] = swap[id(shard)] = leaf
            orig_group = group_range["orig_group"]
            orig_group["params"] = [swap.get(id(p), p) for p in orig_group["params"]]
        return out

    DistributedOptimizer._build_model_and_main_param_groups = classmethod(build)
    try:
        yield
    finally:
        DistributedOptimizer._build_model_and_main_param_groups = orig


def _load_fp32_params_in_hybrid(hdo) -> None:
    """Work around megatron-core 0.16.1's hybrid device optimizer loading state for fp32 model
    parameters: it looks every parameter up among its fp32 copies of *16-bit* ones (KeyError for
    ours, found on 2 H100s). An fp32 parameter's host copy is its own main parameter."""
    import types

    def update_fp32_params_by_new_state(self):
        if not self.param_update_in_fp32:
            return
        for param, v in self.state.items():
            main = self.param_to_fp32_param.get(param, self.gpu_params_map_cpu_copy.get(param))
            if main is not None and "master_param" in v and main is not v["master_param"]:
                main.data.copy_(v["master_param"])

    hdo._update_fp32_params_by_new_state = types.MethodType(update_fp32_params_by_new_state, hdo)


def _zero_hybrid_state(hdo) -> None:
    """What a first step would create in megatron-core's hybrid device optimizer (AdamW state of
    its host copies, then mirrored with their ``master_param``), without moving the parameters:
    its own ``dummy_step`` takes a random step, which would change the weights of a model saved
    before its first step."""
    for sub in hdo.sub_optimizers:
        ensure_adam_state(sub)
    hdo._sync_sub_optimizers_state_to_hdo()


def _precision_aware_for_offload(ocfg) -> None:
    """Optimizer CPU offload runs megatron-core's hybrid device optimizer on the precision-aware
    code path (fp32 main parameters and moments kept by the optimizer, on the host), so
    Megatron-LM requires ``--use-precision-aware-optimizer`` with ``--optimizer-cpu-offload``;
    here the first implies the second. Set after construction: megatron-core 0.16.1's
    OptimizerConfig check of that flag compares Transformer Engine's version and fails when
    it is not installed (found on CPU: TypeError on None), a check the offload path skips."""
    ocfg.use_precision_aware_optimizer = True
    ocfg.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True
    ocfg.store_param_remainders = False  # a Transformer Engine feature


@contextlib.contextmanager
def _tolerate_missing_adam_step(optimizer):
    """Work around megatron-core 0.16.1 without Apex / Transformer Engine (torch's Adam): its
    DistributedOptimizer.load_state_dict first gives every parameter's state a ``step``, then
    copies the saved per-parameter tensors over *all* state keys, and the saved ones have no
    ``step`` (KeyError: 'step', found on 2 H100s). Here the copy skips ``step`` (already set from
    the saved param groups) when the saved tensors lack it."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        orig = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if orig is None:
            continue

        def copy_states(model_param, tensors, _opt=opt, _orig=orig):
            if "step" in tensors or _opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return _orig(model_param, tensors)
            group, order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]]
            step = state.pop("step", None)
            try:
                return _orig(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = copy_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method


def optimizer_state_bytes(dp: MegatronDP, device_type: str | None = None) -> int:
    """Bytes of optimizer state (fp32 main params + moments) held by this rank (on
    ``device_type`` only, when given: 'cuda' vs 'cpu' under optimizer CPU offload)."""
    total = 0
    opts = getattr(dp.optimizer, "chained_optimizers", [dp.optimizer])
    for opt in opts:
        inner = opt.optimizer
        # Under CPU offload the group's params are views of the model's bf16 weights, and the fp32
        # main params live in the state ("master_param"), on the host.
        offloaded = hasattr(inner, "sub_optimizers")
        for group in inner.param_groups:
            for p in group["params"]:
                for v in (*(() if offloaded else (p,)), *inner.state.get(p, {}).values()):
                    if torch.is_tensor(v) and (device_type is None or v.device.type == device_type):
                        total += v.numel() * v.element_size()
    return total
