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


# ----------------------------------------------------------------- trained-model backend + checkpoints

ADAM = dict(lr=1e-2, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.01)


def _train(model, inp, rows, steps, backend=None):
    for _ in range(steps):
        c = {k: v[rows] for k, v in inp.items()}
        (backend.zero_grad() if backend else None)
        _loss(model(c["x"], c["t"], c["ctx"]), c["target"]).backward()
        if backend:
            norm = backend.step()[1]
    return norm if backend else None


def _fsdp_save(state, inp, path):
    from megatron.core import parallel_state as mpu

    from rcm_megatron.parallel import fsdp

    model = WanDiT(preset("tiny")).double()
    model.load_state_dict(state)
    trained = fsdp.FSDPTrainedModel(model, **ADAM)
    r = mpu.get_data_parallel_rank()
    norm = _train(model, inp, slice(r, r + 1), 1, trained)
    fsdp.save_checkpoint(path, {"student": trained})
    return dict(norm=norm, params=fsdp.full_state_dict(model))


def _fsdp_resume(state, inp, path):
    from rcm_megatron.parallel import fsdp

    model = WanDiT(preset("tiny")).double()
    model.load_state_dict(state)  # overwritten by the checkpoint
    trained = fsdp.FSDPTrainedModel(model, **ADAM)
    fsdp.load_checkpoint(path, {"student": trained})
    loaded = fsdp.full_state_dict(model)
    _train(model, inp, slice(0, 2), 1, trained)  # DP 1: the whole batch on one rank
    return dict(loaded=loaded, params=fsdp.full_state_dict(model))


@pytest.mark.slow
def test_fsdp_backend_steps_like_adamw_and_resumes_at_another_dp_size(oracle, tmp_path):
    """DP2 ZeRO-3: one AdamW step equals the unsharded model's on the whole batch (and the same
    gradient norm); its checkpoint loads at DP1 and the next step equals the unsharded second step."""
    ref = WanDiT(preset("tiny")).double()
    ref.load_state_dict(oracle["state"])
    opt = torch.optim.AdamW(ref.parameters(), **ADAM)
    inp = oracle["inp"]
    stepped = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        _loss(ref(inp["x"], inp["t"], inp["ctx"]), inp["target"]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters()))
        opt.step()
        stepped.append(({n: p.detach().clone() for n, p in ref.named_parameters()}, float(norm)))
    path = str(tmp_path / "ckpt")
    saved = run_distributed(_fsdp_save, 2, ParallelConfig(), oracle["state"], inp, path)
    for out in saved:
        assert abs(out["norm"] / stepped[0][1] - 1) < 1e-12
        for n, p in out["params"].items():
            assert rel(p, stepped[0][0][n]) < 1e-12, n
    resumed = run_distributed(_fsdp_resume, 1, ParallelConfig(), oracle["state"], inp, path)[0]
    for n, p in resumed["loaded"].items():
        assert torch.equal(p, saved[0]["params"][n]), n
    for n, p in resumed["params"].items():  # Adam moments and step count came back too
        assert rel(p, stepped[1][0][n]) < 1e-12, n


@pytest.mark.parametrize("factor", [0.3, 10.0])  # clipping active, and a clip above the norm (no change)
def test_clip_grads_with_norm_scales_like_torch(factor):
    from rcm_megatron.parallel import fsdp

    g = torch.Generator().manual_seed(3)
    ours = [torch.nn.Parameter(torch.zeros(4, 5, dtype=torch.float64)) for _ in range(3)]
    theirs = [torch.nn.Parameter(torch.zeros(4, 5, dtype=torch.float64)) for _ in range(3)]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(4, 5, generator=g, dtype=torch.float64)
        b.grad = a.grad.clone()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ours]))
    fsdp.clip_grads_with_norm_(ours, factor * float(norm), float(norm))
    torch.nn.utils.clip_grads_with_norm_(theirs, factor * float(norm), norm)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-14, atol=0)
    new = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ours]))
    assert abs(float(new) - min(factor, 1.0) * float(norm)) < 1e-5 * float(norm)
