"""The megatron-core 0.16.1 workarounds of training/megatron_compat.py, on CPU with torch's
AdamW (what megatron-core's distributed optimizer wraps without Apex / Transformer Engine).
The distributed optimizer itself needs CUDA; its checkpoint round trip was measured on
2 H100s (benchmarks/dist_opt_state_roundtrip.py, docs/performance.md)."""

import types

import torch

from rcm_megatron.training import megatron_compat


def _adamw(n=3):
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]
    return params, torch.optim.AdamW(params, lr=1e-2, betas=(0.0, 0.999))


def _load_with_shared_step(opt, params, value=2.0):
    """What megatron-core's DistributedOptimizer.load_state_dict does: one step tensor for all."""
    step = torch.tensor(value)
    state = {i: {"step": step, "exp_avg": torch.zeros(4), "exp_avg_sq": torch.ones(4)} for i in range(len(params))}
    opt.load_state_dict({"state": state, "param_groups": [{**{k: v for k, v in opt.param_groups[0].items()
                                                                if k != "params"}, "params": list(range(len(params)))}]})


def _one_step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return [float(opt.state[p]["step"]) for p in params]


def test_shared_step_tensor_counts_once_per_parameter():
    """The failure mode: torch increments each parameter's step in place."""
    params, opt = _adamw()
    _load_with_shared_step(opt, params)
    assert len({id(opt.state[p]["step"]) for p in params}) == 1
    assert _one_step(opt, params) == [5.0, 5.0, 5.0]  # 2 + one increment per parameter


def test_unshare_steps_gives_every_parameter_its_own_count():
    params, opt = _adamw()
    _load_with_shared_step(opt, params)
    megatron_compat.unshare_adam_steps(types.SimpleNamespace(optimizer=opt))
    assert len({id(opt.state[p]["step"]) for p in params}) == 3
    assert _one_step(opt, params) == [3.0, 3.0, 3.0]


class _CudaTyped(torch.nn.Parameter):
    """A CPU parameter that reports a CUDA tensor type, so megatron-core's group building
    (which dispatches on ``param.type()``) runs on CPU unchanged."""

    def type(self, *args, **kwargs):
        if args or kwargs:
            return super().type(*args, **kwargs)
        return "torch.cuda.BFloat16Tensor" if self.dtype == torch.bfloat16 else "torch.cuda.FloatTensor"


def _megatron_groups(dtypes_in_buffer_order, numels):
    """megatron-core's own DistributedOptimizer group building over one DP rank owning whole
    parameters, buffers in the given dtype order (the module's first parameter decides it)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range

    params = {dt: [_CudaTyped(torch.zeros(n, dtype=dt)) for n in numels[dt]] for dt in (torch.float32, torch.bfloat16)}
    gbuf_ranges, param_gbuf_map = [], {}
    for b, dt in enumerate(dtypes_in_buffer_order):
        param_map, start = {}, 0
        for p in params[dt]:
            param_map[p] = {"param": Range(0, p.numel()), "gbuf_world": Range(start, start + p.numel())}
            param_gbuf_map[p] = (b, (dt, torch.float32), 0)
            start += p.numel()
        gbuf_ranges.append({(dt, torch.float32): [{"param_map": param_map}]})
    every = [p for dt in dtypes_in_buffer_order for p in params[dt]]
    index_map, group_ranges = DistributedOptimizer._build_optimizer_group_ranges([{"params": every}], gbuf_ranges)
    config = OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16,
                             use_distributed_optimizer=True)
    DistributedOptimizer._build_model_and_main_param_groups(gbuf_ranges, param_gbuf_map, group_ranges, config)
    opt = types.SimpleNamespace(
        opt_group_ranges=group_ranges, model_param_group_index_map=index_map,
        optimizer=types.SimpleNamespace(param_groups=[g["orig_group"] for g in group_ranges]),
        _get_model_param_range_map=lambda p: gbuf_ranges[param_gbuf_map[p][0]][param_gbuf_map[p][1]][0]["param_map"][p])
    return opt


def _mismatches(opt):
    return sum(opt.optimizer.param_groups[g]["params"][o].numel() != opt._get_model_param_range_map(p)["param"].size
               for p, (g, o) in opt.model_param_group_index_map.items())


def test_optimizer_state_maps_to_its_own_parameter_with_bf16_first():
    """megatron-core 0.16.1 numbers a mixed-dtype group in buffer order but orders the inner
    optimizer fp32-first; with the bf16 buffer first (any pipeline stage whose first parameter is
    bf16), checkpoints address another parameter's state. The renumbering fixes the map."""
    from rcm_megatron.training.megatron_compat import fix_param_group_order

    numels = {torch.float32: [3, 5], torch.bfloat16: [7, 11, 13]}
    fp32_first = _megatron_groups((torch.float32, torch.bfloat16), numels)
    assert _mismatches(fp32_first) == 0  # the whole model: its first parameter is fp32
    bf16_first = _megatron_groups((torch.bfloat16, torch.float32), numels)
    assert _mismatches(bf16_first) == 5  # every parameter points at another's state
    fix_param_group_order(bf16_first)
    assert _mismatches(bf16_first) == 0
    fix_param_group_order(fp32_first)
    assert _mismatches(fp32_first) == 0


def test_common_state_with_optimizer_classes_loads(tmp_path):
    """Under optimizer CPU offload megatron-core's param groups carry optimizer classes; the
    checkpoint's common state must still load (torch.load refuses them by default)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import ShardedTensor

    from rcm_megatron.checkpointing.dist_io import load_sharded, read_common
    from rcm_megatron.checkpointing.save import CheckpointManager

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        groups = [{"lr": 1e-4, "cpu_optimizer_cls": torch.optim.AdamW, "gpu_optimizer_cls": torch.optim.AdamW}]
        w = torch.arange(4.0)
        state = {"opt": {"param_groups": groups}, "w": ShardedTensor.from_rank_offsets("w", w, replica_id=0)}
        CheckpointManager(str(tmp_path), async_save=False).save(1, state)
        path = str(tmp_path / "iter_0000001")
        assert read_common(path)["opt"]["param_groups"][0]["cpu_optimizer_cls"] is torch.optim.AdamW
        out = load_sharded(path, {"opt": {}, "w": ShardedTensor.from_rank_offsets("w", torch.zeros(4), replica_id=0)})
        assert torch.equal(out["w"], w)
    finally:
        dist.destroy_process_group()


def test_version_check_names_the_tested_version(monkeypatch):
    """The workarounds reach into megatron-core internals: another version is warned about,
    naming both versions; an internal that is gone is a clear error, not a deep AttributeError."""
    import warnings

    import pytest

    assert megatron_compat.installed_version() == megatron_compat.TESTED_VERSION == "0.16.1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        megatron_compat.check_version()  # the tested version: silent
    monkeypatch.setattr(megatron_compat, "installed_version", lambda: "0.99.0")
    with pytest.warns(RuntimeWarning, match=r"megatron-core 0\.99\.0 is installed.*tested with 0\.16\.1"):
        megatron_compat.check_version()
    with pytest.raises(RuntimeError, match=r"0\.99\.0: object\._set_main_param.* is gone .*tested with 0\.16\.1"):
        megatron_compat._require(object(), "_set_main_param_and_optimizer_states")
