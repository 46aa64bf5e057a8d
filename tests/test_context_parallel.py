"""Context parallelism (Ulysses all-to-all, ring, hierarchical) against the single-process
float64 oracle.

Each layout runs the tiny WanDiT on gloo CPU ranks with the oracle's weights and must
reproduce the oracle's outputs, tangents (torch.func.jvp), regression loss and the gradient
of every parameter, after the trainer's reduction: a SUM over megatron's
data_parallel_group(with_context_parallel=True). Token counts of 18, 15 and 5 (one frame)
are not divisible by every CP size, so padded chunks (and at CP = 4 with 5 tokens a chunk of
padding only) are exercised; 4 heads on 3 ranks exercise the ring where all-to-all cannot
run. One process group per layout runs every comm type (the type is a switch read at
forward time), to keep process starts few.
"""

import pytest
import torch

from distributed_utils import run_distributed
from test_tensor_parallel import _inputs, _loss, _oracle_state, rel
from rcm_megatron.models import WanDiT, preset
from rcm_megatron.parallel.config import ParallelConfig

D = torch.float64
# (latent shape, text length): 18 tokens (3 frames, batch 2), 15 tokens (1 frame), 5 tokens (1 frame).
CASES = [((2, 16, 3, 4, 6), 7), ((1, 16, 1, 6, 10), 5), ((1, 16, 1, 2, 10), 3)]
TOL = {"fp64": 1e-10, "fp32": 2e-5}


def _passes(model, c):
    """y and the loss's gradients (with grad), then (y, ty) of the tangent pass."""
    model.zero_grad(set_to_none=True)
    y = model(c["x"], c["t"], c["ctx"])
    loss = _loss(y, c["target"])
    loss.backward()
    yt, ty = model.forward_with_tangent(c["x"], c["t"], c["ctx"], c["tx"], c["tt"])
    return y.detach(), loss.detach(), yt, ty


@pytest.fixture(scope="module")
def oracle():
    state = _oracle_state()  # the tiny model with every parameter perturbed off its init
    refs = {}
    for dtype, name in ((D, "fp64"), (torch.float32, "fp32")):
        model = WanDiT(preset("tiny")).to(dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        per_case = []
        for i, (shape, text_len) in enumerate(CASES if dtype == D else CASES[:1]):
            inp = {k: v.to(dtype) for k, v in _inputs(shape, text_len, seed=200 + i).items()}
            y, loss, _, ty = _passes(model, inp)
            if dtype == D:  # the tangent oracle is torch.func.jvp of the plain forward
                _, ty = torch.func.jvp(lambda x, t: model(x, t, inp["ctx"]), (inp["x"], inp["t"]),
                                       (inp["tx"], inp["tt"]))
            per_case.append(dict(inp=inp, y=y, loss=loss, ty=ty.detach(),
                                 grads={n: p.grad.clone() for n, p in model.named_parameters()}))
        refs[name] = per_case
    return state, refs


# ----------------------------------------------------------------- what every rank runs


def _count_comm(fn):
    """Run fn() counting CP collectives (all-to-all calls, ring batches, all-gathers)."""
    import torch.distributed as dist

    counts = {"all_to_all": 0, "ring": 0}
    saved = dist.all_to_all_single, dist.batch_isend_irecv

    def wrap(key, f):
        def inner(*a, **k):
            counts[key] += 1
            return f(*a, **k)
        return inner

    dist.all_to_all_single, dist.batch_isend_irecv = wrap("all_to_all", saved[0]), wrap("ring", saved[1])
    try:
        fn()
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = saved
    return counts


def _layout_worker(full_state, refs, comm_types, sp_modes):
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from rcm_megatron.parallel import state
    from rcm_megatron.parallel.sharding import gather_state_dict, load_full_state_dict

    grad_group = mpu.get_data_parallel_group(with_context_parallel=True)  # the trainer's reduction
    out = {"cp": state.context_parallel_world_size(), "errors": {}, "counts": {}}
    models = {}
    for dtype, name in ((D, "fp64"), (torch.float32, "fp32")):
        m = WanDiT(preset("tiny")).to(dtype)
        load_full_state_dict(m, {k: v.to(dtype) for k, v in full_state.items()})
        models[name] = m
    for comm in comm_types:
        state.set_context_parallel_comm_type(comm)
        for sp in sp_modes:
            state.set_sequence_parallel(sp)
            for name, model in models.items():
                for case, ref in enumerate(refs[name]):
                    y, loss, yt, ty = _passes(model, ref["inp"])
                    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                    for g in grads.values():
                        dist.all_reduce(g, group=grad_group)
                    grads = gather_state_dict(model, grads)
                    worst = max((rel(grads[n], g), n) for n, g in ref["grads"].items())
                    out["errors"][(comm, sp, name, case)] = {
                        "y": rel(y, ref["y"]), "yt": rel(yt, ref["y"]), "ty": rel(ty, ref["ty"]),
                        "loss": rel(loss, ref["loss"]), "grad": worst[0], "grad_name": worst[1]}
            c = refs["fp64"][0]["inp"]
            model = models["fp64"]
            with torch.no_grad():
                out["counts"][(comm, sp)] = (
                    _count_comm(lambda: model(c["x"], c["t"], c["ctx"])),
                    _count_comm(lambda: model.forward_with_tangent(c["x"], c["t"], c["ctx"], c["tx"], c["tt"])))
    state.set_sequence_parallel(False)
    return out


def _a2a_refused_worker():
    """all-to-all with 4 heads on 3 CP ranks must refuse to build, pointing at p2p."""
    from rcm_megatron.parallel import state

    state.set_context_parallel_comm_type("a2a")
    try:
        WanDiT(preset("tiny"))
    except ValueError as e:
        return str(e)
    finally:
        state.set_context_parallel_comm_type("p2p")
    return None


# ----------------------------------------------------------------- tests

LAYOUTS = {
    "cp2": (2, ParallelConfig(context_parallel_size=2, cp_comm_type="a2a+p2p",
                              hierarchical_context_parallel_sizes=[1, 2]), ("a2a", "p2p", "a2a+p2p"), (False,)),
    "cp4": (4, ParallelConfig(context_parallel_size=4, cp_comm_type="a2a+p2p",
                              hierarchical_context_parallel_sizes=[2, 2]), ("a2a", "p2p", "a2a+p2p"), (False,)),
    "tp2cp2": (4, ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2, cp_comm_type="p2p"),
               ("a2a", "p2p"), (False, True)),
    "cp3": (3, ParallelConfig(context_parallel_size=3, cp_comm_type="p2p"), ("p2p",), (False,)),
}


@pytest.fixture(scope="module")
def layout_results(oracle):
    full_state, refs = oracle
    cache = {}

    def get(name):
        if name not in cache:
            world, cfg, comms, sps = LAYOUTS[name]
            cache[name] = run_distributed(_layout_worker, world, cfg, full_state, refs, comms, sps)
        return cache[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_matches_oracle(layout_results, layout):
    world, cfg, comms, sps = LAYOUTS[layout]
    ranks = layout_results(layout)
    expected = {(c, sp, d, i) for c in comms for sp in sps for d in ("fp64", "fp32")
                for i in range(len(CASES) if d == "fp64" else 1)}
    for rank, out in enumerate(ranks):
        assert out["cp"] == cfg.context_parallel_size
        assert set(out["errors"]) == expected
        for key, err in out["errors"].items():
            tol = TOL[key[2]]
            for q in ("y", "yt", "ty", "loss", "grad"):
                assert err[q] <= tol, f"rank {rank} {key}: {q} off by {err[q]:.2e} ({err['grad_name']})"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tangents_ride_in_the_primal_collectives(layout_results, layout):
    """a2a: q, k, v (+ q_tan, k_tan, v_tan) in ONE all-to-all and o (+ o_tan) in one back, per layer; ring:
    k, v (+ k_tan, v_tan) in one message per step. The tangent pass adds no communication."""
    world, cfg, comms, sps = LAYOUTS[layout]
    layers, cp = preset("tiny").num_layers, cfg.context_parallel_size
    for out in layout_results(layout):
        for (comm, sp), (fwd, tan) in out["counts"].items():
            assert fwd == tan, (comm, sp, fwd, tan)
            if comm == "a2a":
                assert fwd == {"all_to_all": 2 * layers, "ring": 0}
            elif comm == "p2p":
                assert fwd == {"all_to_all": 0, "ring": (cp - 1) * layers}
            else:
                a, b = cfg.hierarchical_context_parallel_sizes
                assert fwd == {"all_to_all": 2 * layers, "ring": (b - 1) * layers}


@pytest.mark.slow
def test_a2a_needs_heads_divisible_by_cp():
    msgs = run_distributed(_a2a_refused_worker, 3, ParallelConfig(context_parallel_size=3, cp_comm_type="p2p"))
    for m in msgs:
        assert m is not None and "divisible by --context-parallel-size 3" in m and "--cp-comm-type p2p" in m


def test_parallel_config_checks_hierarchical_sizes():
    with pytest.raises(ValueError, match="needs --hierarchical-context-parallel-sizes"):
        ParallelConfig(context_parallel_size=4, cp_comm_type="a2a+p2p")
    with pytest.raises(ValueError, match="must multiply to --context-parallel-size 4"):
        ParallelConfig(context_parallel_size=4, cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=[2, 3])
    with pytest.raises(ValueError, match="only with --cp-comm-type a2a\\+p2p"):
        ParallelConfig(context_parallel_size=4, cp_comm_type="p2p", hierarchical_context_parallel_sizes=[2, 2])
    assert ParallelConfig(context_parallel_size=4, cp_comm_type="a2a+p2p",
                          hierarchical_context_parallel_sizes=(2, 2)).hierarchical_context_parallel_sizes == [2, 2]


def test_validate_cp_messages():
    from rcm_megatron.parallel.context_parallel import validate_cp

    cfg = preset("wan-1.3b")  # 12 heads
    validate_cp(cfg, 1, 4, "a2a")
    validate_cp(cfg, 2, 3, "a2a")
    validate_cp(cfg, 1, 8, "p2p")
    with pytest.raises(ValueError, match=r"12 heads / TP 1 = 12\) divisible by --context-parallel-size 8; "
                                         r"use --cp-comm-type p2p"):
        validate_cp(cfg, 1, 8, "a2a")
    with pytest.raises(ValueError, match="all-to-all size A = 8"):
        validate_cp(cfg, 1, 16, "a2a+p2p", [8, 2])
    validate_cp(cfg, 1, 16, "a2a+p2p", [4, 4])
