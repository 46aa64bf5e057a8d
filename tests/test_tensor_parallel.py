"""Tensor and sequence parallelism against the single-process float64 oracle.

Each layout (TP = 2 and 4, with and without sequence parallelism) runs the tiny WanDiT on
gloo CPU ranks loaded with the oracle's weights and must reproduce the oracle's outputs,
tangents (torch.func.jvp) and the gradient of every parameter of a regression loss, on
every rank. Token counts not divisible by TP exercise the sequence-parallel padding.
"""

import pytest
import torch

from distributed_utils import run_distributed
from rcm_megatron.models import WanConfig, WanDiT, preset
from rcm_megatron.parallel.config import ParallelConfig
from rcm_megatron.parallel.tensor_parallel import validate_tp

D = torch.float64
# (latent shape, text length): 18 tokens (divisible by 2, not 4, batch 2) and 15 tokens (by neither).
CASES = [((2, 16, 3, 4, 6), 7), ((1, 16, 1, 6, 10), 5)]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _inputs(shape, text_len, seed):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    return dict(x=torch.randn(shape, generator=g, dtype=D), t=torch.rand(b, generator=g, dtype=D) * 1000,
                ctx=torch.randn(b, text_len, 64, generator=g, dtype=D), tx=torch.randn(shape, generator=g, dtype=D),
                tt=torch.randn(b, generator=g, dtype=D), target=torch.randn(shape, generator=g, dtype=D))


def _loss(y, target):
    return ((y - target) ** 2).sum()


def _oracle_state():
    """The tiny model with every parameter perturbed (norm weights, biases, tables off their init)."""
    model = WanDiT(preset("tiny")).double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=D))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _run_model(model, inp, dtype):
    c = {k: v.to(dtype) for k, v in inp.items()}
    model.zero_grad(set_to_none=True)
    y = model(c["x"], c["t"], c["ctx"])
    _loss(y, c["target"]).backward()
    with torch.no_grad():
        yt, ty = model.forward_with_tangent(c["x"], c["t"], c["ctx"], c["tx"], c["tt"])
    return y.detach(), yt, ty


@pytest.fixture(scope="module")
def oracle():
    """Float64, one process, plain-math attention; tangents by torch.func.jvp. Float32 layouts
    are held to the same single-process model in float32 (fp32 itself is ~1e-5 off fp64)."""
    state = _oracle_state()
    model = WanDiT(preset("tiny")).double()
    model.load_state_dict(state)
    model32 = WanDiT(preset("tiny"))
    model32.load_state_dict({k: v.float() for k, v in state.items()})
    results = []
    for i, (shape, text_len) in enumerate(CASES):
        inp = _inputs(shape, text_len, seed=100 + i)
        model.zero_grad(set_to_none=True)
        y = model(inp["x"], inp["t"], inp["ctx"])
        _loss(y, inp["target"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        _, ty = torch.func.jvp(lambda x, t: model(x, t, inp["ctx"]), (inp["x"], inp["t"]), (inp["tx"], inp["tt"]))
        y32, _, ty32 = _run_model(model32, inp, torch.float32)  # the layouts run fp32 on the last case only
        grads32 = {n: p.grad.clone() for n, p in model32.named_parameters()}
        results.append(dict(inp=inp, fp64=dict(y=y.detach(), ty=ty.detach(), grads=grads),
                            fp32=dict(y=y32, ty=ty32, grads=grads32)))
    return state, results


# ----------------------------------------------------------------- what every rank runs


def _count_collectives(fn):
    """Run fn() counting the collectives issued by rcm_megatron.parallel.mappings."""
    from rcm_megatron.parallel import mappings

    counts = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
    saved = mappings._all_gather_into, mappings._reduce_scatter_into, mappings._all_reduce

    def wrap(key, f):
        def inner(*a, **k):
            counts[key] += 1
            return f(*a, **k)
        return inner

    mappings._all_gather_into = wrap("all_gather", saved[0])
    mappings._reduce_scatter_into = wrap("reduce_scatter", saved[1])
    mappings._all_reduce = wrap("all_reduce", saved[2])
    try:
        fn()
    finally:
        mappings._all_gather_into, mappings._reduce_scatter_into, mappings._all_reduce = saved
    return counts


def _mapping_checks():
    """all_gather / reduce_scatter / split of padded sequences, tangents packed in one call."""
    from rcm_megatron.parallel import mappings, state

    tp, r = state.tensor_parallel_world_size(), state.tensor_parallel_rank()
    for seq_len in (tp * 3, tp * 3 - 1, 1):
        g = torch.Generator().manual_seed(seq_len)
        full, tfull = torch.randn(2, seq_len, 3, generator=g, dtype=D), torch.randn(2, seq_len, 3, generator=g, dtype=D)
        s = -(-seq_len // tp)
        want = torch.zeros(2, s, 3, dtype=D)
        chunk = full[:, r * s:(r + 1) * s]
        want[:, :chunk.shape[1]] = chunk
        shard, tshard = mappings.split_to_sp_shard(full, tfull)
        assert torch.equal(shard, want)
        back, tback = mappings.all_gather_sequence(shard, tshard, seq_len=seq_len)
        assert torch.equal(back, full) and torch.equal(tback, tfull)
        # partial sums (r + 1) * full on each rank -> shard of tp (tp + 1) / 2 * full
        rs, trs = mappings.reduce_scatter_sequence((r + 1) * full, (r + 1) * tfull)
        k = tp * (tp + 1) / 2
        assert torch.allclose(rs, k * want, rtol=1e-14) and torch.allclose(trs,
                                                                          k * mappings.split_to_sp_shard(tfull)[0])
    return True


def _layout_worker(full_state, cases):
    from rcm_megatron.parallel import state
    from rcm_megatron.parallel.sharding import gather_state_dict, load_full_state_dict

    out = {"sequence_parallel": state.sequence_parallel_enabled(), "mappings": _mapping_checks()}
    try:  # a config the layout cannot split fails in the constructor, before any allocation
        WanDiT(WanConfig(num_layers=1, hidden_size=128, ffn_hidden_size=255, num_attention_heads=4, text_dim=64))
        out["bad_ffn"] = None
    except ValueError as e:
        out["bad_ffn"] = str(e)
    # Layout-independent init: the TP model gathers back to exactly the TP = 1 model.
    out["init"] = gather_state_dict(WanDiT(preset("tiny")))
    results = []
    for dtype in (D, torch.float32):
        model = WanDiT(preset("tiny")).to(dtype)
        load_full_state_dict(model, {k: v.to(dtype) for k, v in full_state.items()})
        if dtype == D:
            assert all(torch.equal(v, full_state[k]) for k, v in gather_state_dict(model).items())
        per_case = []
        for inp in (cases if dtype == D else cases[-1:]):
            y, yt, ty = _run_model(model, inp, dtype)
            grads = gather_state_dict(model, {n: p.grad for n, p in model.named_parameters()})
            per_case.append(dict(y=y, yt=yt, ty=ty, grads=grads))
        results.append(per_case)
    out["fp64"], out["fp32"] = results
    c = {k: v.to(torch.float32) for k, v in cases[-1].items()}
    with torch.no_grad():
        out["count_forward"] = _count_collectives(lambda: model(c["x"], c["t"], c["ctx"]))
        out["count_tangent"] = _count_collectives(
            lambda: model.forward_with_tangent(c["x"], c["t"], c["ctx"], c["tx"], c["tt"]))
    return out


# ----------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_tensor_parallel_matches_oracle(oracle, tp, sp):
    full_state, ref = oracle
    ranks = run_distributed(_layout_worker, tp, ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp),
                            full_state, [r["inp"] for r in ref])
    init = WanDiT(preset("tiny")).state_dict()
    layers = preset("tiny").num_layers
    for rank, out in enumerate(ranks):
        assert out["sequence_parallel"] is sp and out["mappings"]
        assert out["bad_ffn"] == f"--tensor-model-parallel-size {tp} must divide ffn_hidden_size=255"
        for k, v in init.items():
            assert torch.equal(out["init"][k], v), f"rank {rank}: init of {k} depends on the layout"
        for dtype, tol in (("fp64", 1e-10), ("fp32", 1e-5)):
            for case, (got, want) in enumerate(zip(out[dtype], [r[dtype] for r in ref][-len(out[dtype]):])):
                where = f"rank {rank} {dtype} case {case}"
                assert rel(got["y"], want["y"]) <= tol, where
                assert rel(got["yt"], want["y"]) <= tol, where
                assert rel(got["ty"], want["ty"]) <= tol, (where, rel(got["ty"], want["ty"]))
                assert set(got["grads"]) == set(want["grads"])
                for name, gw in want["grads"].items():
                    e = rel(got["grads"][name], gw)
                    assert e <= tol, f"{where}: gradient of {name} off by {e:.2e}"
        # Tangents ride in the primal's collectives: the tangent pass issues no extra ones.
        fwd, tan = out["count_forward"], out["count_tangent"]
        assert fwd == tan, (fwd, tan)
        if sp:
            assert fwd == {"all_gather": 3 * layers + 1, "reduce_scatter": 3 * layers, "all_reduce": 4 * layers}
        else:
            assert fwd == {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 7 * layers}


def test_validate_tp_rejects_before_allocation():
    cfg = preset("tiny")
    validate_tp(cfg, 4)
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 3 must divide num_attention_heads=4"):
        validate_tp(cfg, 3)
    odd_ffn = WanConfig(num_layers=1, hidden_size=128, ffn_hidden_size=250, num_attention_heads=4, text_dim=64)
    with pytest.raises(ValueError, match=r"ffn_hidden_size=250"):
        validate_tp(odd_ffn, 4)
    with pytest.raises(ValueError, match=r"world size 6"):
        validate_tp(cfg, 4, world_size=6)
    with pytest.raises(ValueError, match="positive integer"):
        validate_tp(cfg, 0)


def test_shard_state_dict_roundtrip_single_process():
    from rcm_megatron.parallel.sharding import shard_state_dict, tensor_parallel_split_dims

    model = WanDiT(preset("tiny"))
    full = model.state_dict()
    dims = tensor_parallel_split_dims(model)
    assert dims["blocks.0.attn1.to_q.weight"] == 0 and dims["blocks.0.attn1.to_out.weight"] == 1
    assert dims["blocks.0.attn1.norm_q.weight"] == 0 and dims["blocks.0.attn1.to_out.bias"] is None
    parts = [shard_state_dict(full, model, rank=r, size=4) for r in range(4)]
    assert parts[1]["blocks.0.ffn.fc1.weight"].shape == (64, 128)
    assert torch.equal(torch.cat([p["blocks.0.ffn.fc2.weight"] for p in parts], 1), full["blocks.0.ffn.fc2.weight"])
    assert parts[3]["proj_out.weight"] is full["proj_out.weight"]
