"""ZeRO-3 parameter sharding (FSDP2 over DP x CP) against the unsharded float64 model.

Every layout runs the tiny WanDiT on gloo CPU ranks, each data-parallel rank on its own sample
of a batch of 2, with the oracle's weights, sharded by ``parallel.fsdp.shard_model``. Outputs
and tangents must equal the unsharded model's on that sample, and the gradients, reduce-scattered
over DP x CP (a sum), the unsharded model's gradients of the whole batch (TP-sliced). The tangent
pass must gather every unit exactly as the forward does and leave the parameters sharded.
"""

import pytest
import torch

from distributed_utils import run_distributed
from test_tensor_parallel import _inputs, _loss, _oracle_state, rel
from rcm_megatron.models import WanDiT, preset
from rcm_megatron.parallel.config import ParallelConfig

SHAPE, TEXT = (2, 16, 3, 4, 6), 7


@pytest.fixture(scope="module")
def oracle():
    state = _oracle_state()
    model = WanDiT(preset("tiny")).double()
    model.load_state_dict(state)
    inp = _inputs(SHAPE, TEXT, seed=300)
    y = model(inp["x"], inp["t"], inp["ctx"])
    _loss(y, inp["target"]).backward()
    _, ty = model.forward_with_tangent(inp["x"], inp["t"], inp["ctx"], inp["tx"], inp["tt"])
    return dict(state=state, inp=inp, y=y.detach(), ty=ty, grads={n: p.grad.clone() for n, p in model.named_parameters()})


def _count_gathers(fn):
    """fn() and the number of FSDP2 unit all-gathers it ran."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    calls = []
    orig = group.foreach_all_gather

    def counted(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    group.foreach_all_gather = counted
    try:
        out = fn()
    finally:
        group.foreach_all_gather = orig
    return out, len(calls)


def _sharded_run(state, inp):
    from megatron.core import parallel_state as mpu

    from rcm_megatron.parallel import fsdp
    from rcm_megatron.parallel.sharding import load_full_state_dict

    model = WanDiT(preset("tiny")).double()
    load_full_state_dict(model, state)
    split = {n: getattr(p, "tp_split_dim", None) for n, p in model.named_parameters()}
    fsdp.shard_model(model)
    assert fsdp.is_sharded(model)
    assert {n: getattr(p, "tp_split_dim", None) for n, p in model.named_parameters()} == split
    r = mpu.get_data_parallel_rank()
    c = {k: v[r:r + 1] for k, v in inp.items()}
    y, n_fwd = _count_gathers(lambda: model(c["x"], c["t"], c["ctx"]))
    _loss(y, c["target"]).backward()
    (yt, ty), n_tan = _count_gathers(lambda: model.forward_with_tangent(c["x"], c["t"], c["ctx"], c["tx"], c["tt"]))
    local_numel = sum(fsdp.local_tensor(p).numel() for p in model.parameters())
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    from rcm_megatron.planning.params import fsdp_shard_numel

    n = torch.distributed.get_world_size(fsdp.shard_group())
    planned = sum(fsdp_shard_numel(tuple(g.shape), n) for g in grads.values())
    return dict(y=y.detach(), yt=yt, ty=ty, grads=grads, split=split, gathers=(n_fwd, n_tan),
                local_numel=local_numel, planned_numel=planned,
                shard_rank=torch.distributed.get_rank(fsdp.shard_group()), dp_rank=r)


def _check(outs, ref, tp):
    from rcm_megatron.parallel.sharding import shard_tensor

    for rank, out in enumerate(outs):
        r = out["dp_rank"]
        assert rel(out["y"], ref["y"][r:r + 1]) < 1e-12 and rel(out["yt"], ref["y"][r:r + 1]) < 1e-12
        assert rel(out["ty"], ref["ty"][r:r + 1]) < 1e-12
        tp_rank = rank % tp  # megatron order tp-cp-dp-pp: TP varies fastest
        for name, g in out["grads"].items():
            want = shard_tensor(ref["grads"][name], out["split"][name], tp_rank, tp)
            assert rel(g, want) < 1e-10, (rank, name, rel(g, want))
        n_fwd, n_tan = out["gathers"]
        assert n_fwd == n_tan == preset("tiny").num_layers + 1  # every block and the root, once
        # sharded over DP x CP: rank 0 of the group holds ceil(dim0 / n) rows of every parameter, the
        # planner's per-rank count; the others no more
        planned, k = out["planned_numel"], out["shard_rank"]
        assert out["local_numel"] == planned if k == 0 else out["local_numel"] <= planned


@pytest.mark.slow
def test_fsdp_dp2_equals_unsharded(oracle):
    outs = run_distributed(_sharded_run, 2, ParallelConfig(), oracle["state"], oracle["inp"])
    _check(outs, oracle, tp=1)


@pytest.mark.slow
def test_fsdp_dp2_tp2_sp_equals_unsharded(oracle):
    par = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    outs = run_distributed(_sharded_run, 4, par, oracle["state"], oracle["inp"])
    _check(outs, oracle, tp=2)


@pytest.mark.slow
@pytest.mark.parametrize("comm", ["a2a", "p2p"])
def test_fsdp_dp2_cp2_equals_unsharded(oracle, comm):
    par = ParallelConfig(context_parallel_size=2, cp_comm_type=comm)
    outs = run_distributed(_sharded_run, 4, par, oracle["state"], oracle["inp"])
    _check(outs, oracle, tp=1)
