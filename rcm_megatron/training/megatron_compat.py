"""Every place where rcm-megatron reaches into megatron-core's internals, in one module.

The distributed-optimizer backend (``megatron_dp.py``) needs fixes that megatron-core 0.16.1
lacks for our models (mixed-dtype parameters, torch's Adam without Apex / Transformer Engine,
a time embedding held by every pipeline stage). Each fix below names the fault it fixes and
where it was found; together they use 3 method patches (``_build_model_and_main_param_groups``,
``_set_main_param_and_optimizer_states``, the hybrid optimizer's
``_update_fp32_params_by_new_state``), 3 private calls (``_allreduce_conditional_embedding_grads``,
``_get_model_param_range_map``, ``_sync_sub_optimizers_state_to_hdo``) and internal attributes
(``chained_optimizers``, ``opt_group_ranges``, ``model_param_group_index_map``,
``sub_optimizers``, ``param_to_fp32_param``, ``gpu_params_map_cpu_copy``, the parameter flags
``pipeline_parallel`` / ``shared`` / ``shared_embedding`` and ``has_cond_embedder``).

They are written against megatron-core ``TESTED_VERSION``. ``check_version`` runs before any
of them is applied: on another version it warns once, naming both versions and the tests
that re-validate the fixes (tests/test_megatron_dp_workarounds.py on CPU,
benchmarks/dist_opt_state_roundtrip.py on GPUs); an internal that has gone raises a
``RuntimeError`` naming it instead of failing deep inside megatron-core. A warning rather
than a refusal: a newer release may have fixed the faults itself, and the fixes are written
to be harmless then (they renumber to the order the optimizer already uses, skip what is
already present).
"""

from __future__ import annotations

import contextlib
import types
import warnings

import torch

from ..checkpointing.sharded_state import PIPELINE_REPLICATED, ensure_adam_state

TESTED_VERSION = "0.16.1"
_checked: list[str] = []


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist_name in ("megatron-core", "megatron_core"):
        try:
            return version(dist_name)
        except PackageNotFoundError:
            continue
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def check_version() -> str:
    """Warn (once per process) when the installed megatron-core is not the tested one."""
    v = installed_version()
    if v != TESTED_VERSION and v not in _checked:
        warnings.warn(f"megatron-core {v} is installed; rcm-megatron's distributed-optimizer workarounds "
                      f"(rcm_megatron/training/megatron_compat.py) were tested with {TESTED_VERSION}. Re-validate "
                      "with tests/test_megatron_dp_workarounds.py and benchmarks/dist_opt_state_roundtrip.py",
                      RuntimeWarning, stacklevel=2)
    _checked.append(v)
    return v


def _require(obj, name: str):
    if not hasattr(obj, name):
        raise RuntimeError(f"megatron-core {installed_version()}: {type(obj).__name__}.{name} is gone (a workaround "
                           f"in rcm_megatron/training/megatron_compat.py relies on it; tested with {TESTED_VERSION})")
    return getattr(obj, name)


def inner_optimizers(optimizer) -> list:
    """The DistributedOptimizers of a (possibly chained) megatron optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_hybrid(torch_optimizer) -> bool:
    """Whether an inner optimizer is megatron-core's hybrid device optimizer (CPU offload)."""
    return hasattr(torch_optimizer, "sub_optimizers")


def mark_pipeline_replicated(module, tcfg, pipeline_first_stage: bool) -> None:
    """Under PP every stage holds the time embedding: megatron-core's conditional-embedder flags
    make its gradient summed over the stages after the DP reduction and counted once in the
    norm."""
    tcfg.has_cond_embedder = True
    for name, p in module.named_parameters():
        if name.startswith(PIPELINE_REPLICATED):
            p.pipeline_parallel = True  # summed over the stages after the DP reduction
            p.shared = not pipeline_first_stage  # counted once in the gradient norm
            # Its own grad-buffer bucket, so every stage shards it over DP alike: the stage
            # sum above adds the DP-reduced shards of the *same* elements (otherwise each
            # stage stepped its copy with a different gradient; found on 4 H100s).
            p.shared_embedding = True


def allreduce_pipeline_replicated_grads(ddp, tcfg) -> None:
    """megatron-core's conditional-embedder gradient sum over the stages (the one its DiT models
    use; a private function of finalize_model_grads)."""
    from megatron.core.distributed import finalize_model_grads

    _require(finalize_model_grads, "_allreduce_conditional_embedding_grads")([ddp], tcfg)


_HALF = ("torch.cuda.HalfTensor", "torch.cuda.BFloat16Tensor")


def fix_param_group_order(optimizer) -> None:
    """Work around megatron-core 0.16.1 with mixed-dtype models (ours keeps the time embedding,
    modulation tables and norms in fp32, as Wan does): the inner optimizer's groups hold the fp32
    parameters' shards first, then the bf16 ones, but ``model_param_group_index_map`` numbers
    them in grad-buffer order, which puts bf16 first whenever the module's first parameter is
    bf16 (a pipeline stage other than the last). Checkpoints then read and wrote another
    parameter's optimizer state (found on 4 H100s: size mismatch at the first PP2 save, and a
    silent mix-up wherever sizes agree). Renumbered here to the inner optimizer's order, and
    checked element counts against the grad-buffer ranges."""
    for opt in inner_optimizers(optimizer):
        if not hasattr(opt, "opt_group_ranges"):
            continue
        index_map = _require(opt, "model_param_group_index_map")
        range_map = _require(opt, "_get_model_param_range_map")
        for g, group_range in enumerate(opt.opt_group_ranges):
            params = group_range["params"]
            ordered = [p for p in params if p.type() not in _HALF] + [p for p in params if p.type() in _HALF]
            for order, p in enumerate(ordered):
                index_map[p] = (g, order)
        for p, (g, order) in index_map.items():
            inner = opt.optimizer.param_groups[g]["params"][order]
            rng = range_map(p)["param"]
            if inner.numel() != rng.size:
                raise RuntimeError(f"distributed optimizer: parameter of shape {tuple(p.shape)} maps to an optimizer "
                                   f"tensor of {inner.numel()} elements, its shard has {rng.size}")


@contextlib.contextmanager
def leaf_fp32_shards():
    """Work around megatron-core 0.16.1's CPU offload with fp32 model parameters: on the
    precision-aware path their shards are views of parameters that require grad (non-leaf), and
    the hybrid device optimizer's constructor refuses them ("can't optimize a non-leaf Tensor",
    found on 2 H100s). Detached views share the storage, keep the attributes, and replace the
    originals both in the optimizer groups and where gradients are attached."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _require(DistributedOptimizer, "_build_model_and_main_param_groups")
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


def load_fp32_params_in_hybrid(optimizer) -> None:
    """Work around megatron-core 0.16.1's hybrid device optimizer loading state for fp32 model
    parameters: it looks every parameter up among its fp32 copies of *16-bit* ones (KeyError for
    ours, found on 2 H100s). An fp32 parameter's host copy is its own main parameter."""

    def update_fp32_params_by_new_state(self):
        if not self.param_update_in_fp32:
            return
        for param, v in self.state.items():
            main = self.param_to_fp32_param.get(param, self.gpu_params_map_cpu_copy.get(param))
            if main is not None and "master_param" in v and main is not v["master_param"]:
                main.data.copy_(v["master_param"])

    for opt in inner_optimizers(optimizer):
        hdo = opt.optimizer
        _require(hdo, "_update_fp32_params_by_new_state")
        hdo._update_fp32_params_by_new_state = types.MethodType(update_fp32_params_by_new_state, hdo)


def zero_hybrid_state(hdo) -> None:
    """What a first step would create in megatron-core's hybrid device optimizer (AdamW state of
    its host copies, then mirrored with their ``master_param``), without moving the parameters:
    its own ``dummy_step`` takes a random step, which would change the weights of a model saved
    before its first step."""
    for sub in hdo.sub_optimizers:
        ensure_adam_state(sub)
    _require(hdo, "_sync_sub_optimizers_state_to_hdo")()


def ensure_optimizer_state(optimizer) -> None:
    """Materialize AdamW state (zeros, step 0) so a fresh optimizer has tensors to load into.

    megatron-core's DistributedOptimizer.state_dict() reads every parameter's ``step``
    when neither Apex nor Transformer Engine is installed; before the first step there is
    none, so loading a checkpoint into a fresh run needs this (found on 2 H100s).
    """
    for opt in inner_optimizers(optimizer):
        inner = opt.optimizer
        if is_hybrid(inner):  # CPU offload: the hybrid device optimizer
            if len(inner.state) == 0:
                zero_hybrid_state(inner)
        else:
            ensure_adam_state(inner)


def precision_aware_for_offload(ocfg) -> None:
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
def tolerate_missing_adam_step(optimizer):
    """Work around megatron-core 0.16.1 without Apex / Transformer Engine (torch's Adam): its
    DistributedOptimizer.load_state_dict first gives every parameter's state a ``step``, then
    copies the saved per-parameter tensors over *all* state keys, and the saved ones have no
    ``step`` (KeyError: 'step', found on 2 H100s). Here the copy skips ``step`` (already set from
    the saved param groups) when the saved tensors lack it."""
    patched = []
    for opt in inner_optimizers(optimizer):
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


def unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16.1 (no Apex/TE) gives every parameter's state the *same* ``step``
    tensor on load; torch's Adam increments each parameter's step in place, so the shared
    one would count once per parameter and wreck the bias correction after a resume (seen
    on 2 H100s: resumed losses drifted from the first step on). One tensor per parameter."""
    for opt in inner_optimizers(optimizer):
        for st in opt.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
