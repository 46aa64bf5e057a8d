"""Pipeline parallelism against the single-process step plan (docs/design.md §2.5 and §5.4).

Each layout (PP = 2, PP = 4, PP = 2 x TP = 2) runs the pipelined rCM step plan of
``training/pipeline_step.py`` on gloo CPU ranks with the 4-block tiny model in float64: a
student step (sCM + DMD, rollouts of 1-3 steps per sample, so later rollout steps run on
subsets), a critic step and a flow-matching step, with one micro-batch of 4 samples and four
micro-batches of 1. Every loss term, every diagnostic and the gradient of every parameter
(after the time embedding's sum over stages) must equal the PP = 1 step (``rcm.step`` per
micro-batch, as the trainer runs it) for the same data and seeds.

PP = 2 x CP = 2 (ring and all-to-all attention) runs student and critic steps on latents of
3 x 1 x 3 = 9 tokens, so the stages exchange zero-padded CP chunks of 5 tokens; gradients are
summed over CP (the trainer's DP x CP reduction) before the comparison.
"""

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed
from rcm_megatron.models import WanDiT, preset
from rcm_megatron.parallel.config import ParallelConfig
from rcm_megatron.parallel.pipeline import PipelineLayout, StageLink, stage_layer_range
from rcm_megatron.parallel.stage_message import decode_header, encode_header, pack_tensors, specs_of, unpack_tensors
from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.schedule import phase
from rcm_megatron.rcm.step import Batch, critic_step, student_step
from rcm_megatron.training import pipeline_step
from rcm_megatron.training.flow_matching import flow_matching_loss

D = torch.float64
CFG = preset("tiny-4l")
RCM = RCMConfig(student_update_freq=2, rollout_max_steps=3)
N = 4  # samples of the (DP rank's) batch
STUDENT_IT, CRITIC_IT = 9, 0  # rollout lengths [3, 1, 3, 2] and [3, 1, 1, 2] for samples 10..13
CASES = [("student", 1), ("student", 4), ("critic", 4), ("flow", 2)]
LATENT = (16, 2, 4, 4)  # 8 tokens
CP_CASES = [("student", 1), ("student", 4), ("critic", 1), ("critic", 4)]
CP_LATENT = (16, 3, 2, 6)  # 9 tokens: CP = 2 pads the second chunk; 3 frames on 2 ranks
RTOL = 1e-9


def _states():
    """Teacher, student and fake score: the tiny-4l init perturbed differently (off their init values)."""
    out = []
    for seed in (1, 2, 3):
        m = WanDiT(CFG).double()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=D))
        out.append({k: v.clone() for k, v in m.state_dict().items()})
    return out


def _batches(num_micro, latent=LATENT):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(N, *latent, generator=g, dtype=D)
    ctx = torch.randn(N, 5, 64, generator=g, dtype=D)
    unc = torch.randn(1, 5, 64, generator=g, dtype=D)
    idx = torch.arange(10, 10 + N)
    m = N // num_micro
    return [Batch(x0[i:i + m], ctx[i:i + m], unc, idx[i:i + m]) for i in range(0, N, m)]


def _take_grads(model):
    from rcm_megatron.parallel.sharding import gather_state_dict

    grads = {n: p.grad for n, p in model.named_parameters()}
    if dist.is_initialized():  # partial over CP: the trainer's reduction over DP x CP sums them
        from megatron.core import parallel_state as mpu

        group = mpu.get_data_parallel_group(with_context_parallel=True)
        for g in grads.values():
            dist.all_reduce(g, group=group)
    grads = gather_state_dict(model, grads)
    model.zero_grad(set_to_none=True)
    return grads


def _reference_case(models, kind, num_micro, latent=LATENT):
    """PP = 1, the trainer's path: rcm.step / flow matching per micro-batch, loss / global batch."""
    teacher, student, fake = models
    totals = {}
    batches = _batches(num_micro, latent)
    for b in batches:
        if kind == "student":
            out = student_step(RCM, teacher, student, fake, b, STUDENT_IT, loss_normalizer=N,
                               phase=phase(RCM, STUDENT_IT))
        elif kind == "critic":
            out = critic_step(RCM, student, fake, b, CRITIC_IT, loss_normalizer=N)
        else:
            loss = flow_matching_loss(student, b.x0, b.context, b.uncond_context, b.indices, 0, 3)[0] / N
            loss.backward()
            out = {"loss_flow_matching": loss.detach()}
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v) * (1.0 if k.startswith("loss") else 1.0 / len(batches))
    return totals, _take_grads(fake if kind == "critic" else student)


def _pipelined_case(models, kind, num_micro, link, latent=LATENT):
    teacher, student, fake = models
    batches = _batches(num_micro, latent)
    if kind == "student":
        out = pipeline_step.student_step(RCM, teacher, student, fake, batches, STUDENT_IT, link, loss_normalizer=N,
                                         phase=phase(RCM, STUDENT_IT))
    elif kind == "critic":
        out = pipeline_step.critic_step(RCM, student, fake, batches, CRITIC_IT, link, loss_normalizer=N)
    else:
        out = pipeline_step.flow_matching_step(student, batches, 0, 3, link, loss_normalizer=N)
    trained = fake if kind == "critic" else student
    pipeline_step.all_reduce_replicated_grads(trained, link.layout)
    return {k: float(v) for k, v in out.items()}, _take_grads(trained)


def _stage_models(states):
    from rcm_megatron.parallel.sharding import load_full_state_dict

    layout = PipelineLayout.current()
    rng = stage_layer_range(CFG.num_layers, layout.size, layout.rank)
    models = []
    for sd, trainable in zip(states, (False, True, True)):
        m = WanDiT(CFG, pre_process=layout.is_first, post_process=layout.is_last, layer_range=rng).double()
        load_full_state_dict(m, sd)
        models.append(m.requires_grad_(trainable))
    return layout, models


def _rank_run(states, cases=CASES, latent=LATENT):
    from rcm_megatron.parallel import state

    layout, models = _stage_models(states)
    link = StageLink(layout, "cpu")
    cases = [_pipelined_case(models, kind, m, link, latent) for kind, m in cases]
    return {"pp_rank": layout.rank, "is_last": layout.is_last, "tp_rank": state.tensor_parallel_rank(),
            "cp_rank": state.context_parallel_rank(), "cases": cases}


def _reference(cases, latent):
    states = _states()
    models = []
    for sd, trainable in zip(states, (False, True, True)):
        m = WanDiT(CFG).double()
        m.load_state_dict(sd)
        models.append(m.requires_grad_(trainable))
    return states, [_reference_case(models, kind, m, latent) for kind, m in cases]


@pytest.fixture(scope="module")
def reference():
    return _reference(CASES, LATENT)


@pytest.fixture(scope="module")
def cp_reference():
    return _reference(CP_CASES, CP_LATENT)


def _close(a, b):
    return abs(a - b) <= RTOL * max(abs(b), 1e-12)


def _check(results, reference, pp, cases=CASES):
    _, ref_cases = reference
    assert sorted({r["pp_rank"] for r in results}) == list(range(pp))
    for c, (kind, num_micro) in enumerate(cases):
        ref_vals, ref_grads = ref_cases[c]
        seen = set()
        for r in results:
            vals, grads = r["cases"][c]
            assert set(vals) == set(ref_vals), (kind, num_micro)
            for k, v in vals.items():
                if k.startswith("loss") and not r["is_last"]:
                    continue  # losses live on the last stage
                assert _close(v, ref_vals[k]), (kind, num_micro, r["pp_rank"], k, v, ref_vals[k])
            for name, g in grads.items():
                err = ((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-30)).item()
                assert err < RTOL, (kind, num_micro, r["pp_rank"], name, err)
                seen.add(name)
        assert seen == set(ref_grads), (kind, num_micro, sorted(set(ref_grads) - seen))


@pytest.mark.slow
@pytest.mark.parametrize("pp,tp", [(2, 1), (4, 1), (2, 2)])
def test_pipelined_steps_match_single_process(reference, pp, tp):
    states, _ = reference
    par = ParallelConfig(pipeline_model_parallel_size=pp, tensor_model_parallel_size=tp, sequence_parallel=tp > 1)
    results = run_distributed(_rank_run, pp * tp, par, states, timeout=900)
    _check(results, reference, pp)


@pytest.mark.slow
@pytest.mark.parametrize("comm_type", ["p2p", "a2a"])
def test_pipelined_steps_with_context_parallel_match_single_process(cp_reference, comm_type):
    """PP = 2 x CP = 2: stage boundaries carry each CP rank's padded chunk."""
    states, _ = cp_reference
    par = ParallelConfig(pipeline_model_parallel_size=2, context_parallel_size=2, cp_comm_type=comm_type)
    results = run_distributed(_rank_run, 4, par, states, CP_CASES, CP_LATENT, timeout=900)
    assert sorted((r["pp_rank"], r["cp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _check(results, cp_reference, 2, CP_CASES)


@pytest.mark.slow
def test_single_stage_plan_matches_step_functions(reference):
    """The same plan at PP = 1 (no communication) reproduces rcm.step in-process."""
    states, _ = reference
    layout, models = _stage_models(states)
    assert layout.size == 1
    results = [{"pp_rank": 0, "is_last": True, "tp_rank": 0,
                "cases": [_pipelined_case(models, kind, m, StageLink(layout, "cpu")) for kind, m in CASES]}]
    _check(results, reference, 1)


def test_stage_layer_ranges():
    assert [stage_layer_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stage_layer_range(30, 1, 0) == (0, 30)
    with pytest.raises(ValueError, match="must divide the number of transformer blocks"):
        stage_layer_range(30, 4, 0)


def test_packing_round_trip():
    """One buffer for primal, tangent (or an empty slot) and text of mixed dtypes."""
    x = torch.randn(2, 7, 3)
    tx = torch.randn(2, 7, 3, dtype=D)
    ctx = torch.randn(2, 5, 3).to(torch.bfloat16)
    for tensors in ([x, tx, ctx], [x, None, ctx]):
        specs = decode_header(encode_header(specs_of(tensors)))
        assert specs == specs_of(tensors)
        out = unpack_tensors(pack_tensors(tensors, "cpu"), specs)
        for a, b in zip(out, tensors):
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
