"""The two megatron-core 0.16.1 workarounds of training/megatron_dp.py, on CPU with torch's
AdamW (what megatron-core's distributed optimizer wraps without Apex / Transformer Engine).
The distributed optimizer itself needs CUDA; its checkpoint round trip was measured on
2 H100s (benchmarks/dist_opt_state_roundtrip.py, docs/performance.md)."""

import types

import torch

from rcm_megatron.training.megatron_dp import MegatronDP


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
    stub = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=opt))
    MegatronDP._unshare_steps(stub)
    assert len({id(opt.state[p]["step"]) for p in params}) == 3
    assert _one_step(opt, params) == [3.0, 3.0, 3.0]
