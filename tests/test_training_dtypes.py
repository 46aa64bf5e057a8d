"""Under --bf16 every training pass hands attention bf16 inputs, on both optimizer paths.

The trainer runs each rCM step under ``torch.autocast(bf16)``. On the plain AdamW path the
student and fake score keep fp32 master weights (the teacher is cast to bf16); on the
``--use-distributed-optimizer`` path megatron-core trains bf16 parameters (``to_dtype``, with
norms, modulation and time embedding kept fp32). A layer that promotes the activations to
fp32 in one pass only (an fp32 bias added after a bf16 GEMM did, in the tangent pass) sends
fp32 q/k/v to the fused kernel, which then falls back to O(L^2) plain math on the GPU. The
same autocast runs on CPU, so the dtypes that reach attention are checked here.
"""

import pytest
import torch

import rcm_megatron.models.attention as model_attention
from rcm_megatron.kernels.dispatch import (AttentionFallbackError, add_pass_observer, current_pass,
                                           remove_pass_observer)
from rcm_megatron.models.config import preset
from rcm_megatron.models.wan import WanDiT
from rcm_megatron.parallel import tensor_parallel
from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.step import Batch, critic_step, student_step

CFG = preset("tiny")
STUDENT_PASSES = {"teacher CFG (sCM)", "student tangent", "student with-grad (sCM)", "student rollout (dmd)",
                  "fake score (DMD)", "teacher CFG (DMD)", "student with-grad (DMD)", "student backward (scm)", "student backward (dmd)"}
CRITIC_PASSES = {"student rollout (critic)", "fake score with-grad (critic)", "fake score backward (critic)"}


def _models(path: str):
    teacher = WanDiT(CFG).to_dtype(torch.bfloat16).eval()
    student, fake = WanDiT(CFG), WanDiT(CFG)
    if path == "distributed-optimizer":
        student.to_dtype(torch.bfloat16)
        fake.to_dtype(torch.bfloat16)
    return teacher, student, fake


def _batch(n=2):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, CFG.in_channels, 3, 4, 4, generator=g)
    ctx = torch.randn(n, 8, CFG.text_dim, generator=g)
    return Batch(x0, ctx, torch.zeros(1, 8, CFG.text_dim), torch.arange(n))


@pytest.fixture()
def record(monkeypatch):
    """(pass, function, {name: dtype}) of every attention call the model makes."""
    calls = []

    def wrap(name, fn):
        def recorded(q, k, v, *rest, **kw):
            tangents = rest[:3] if name == "attention_with_tangent" else ()
            dtypes = {n: t.dtype for n, t in zip(("q", "k", "v", "q_tan", "k_tan", "v_tan"), (q, k, v, *tangents))
                      if t is not None}
            calls.append((current_pass(), name, dtypes))
            return fn(q, k, v, *rest, **kw)
        return recorded

    monkeypatch.setattr(model_attention, "attention", wrap("attention", model_attention.attention))
    monkeypatch.setattr(model_attention, "attention_with_tangent",
                        wrap("attention_with_tangent", model_attention.attention_with_tangent))
    return calls


@pytest.mark.parametrize("path", ["plain", "distributed-optimizer"])
def test_every_pass_reaches_attention_in_bf16(record, path):
    teacher, student, fake = _models(path)
    cfg = RCMConfig(student_update_freq=2, rollout_max_steps=2)
    seen = []
    observer = lambda name, begins: seen.append(name) if begins else None  # noqa: E731
    add_pass_observer(observer)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            student_step(cfg, teacher, student, fake, _batch(), iteration=1)
            critic_step(cfg, student, fake, _batch(), iteration=0)
    finally:
        remove_pass_observer(observer)
    assert set(seen) == STUDENT_PASSES | CRITIC_PASSES
    forward = {p for p in seen if "backward" not in p}
    assert {p for p, _, _ in record} == forward  # every forward pass ran attention, inside its name
    tangent = [c for c in record if c[1] == "attention_with_tangent"]
    assert tangent and {p for p, _, _ in tangent} == {"student tangent"}
    wrong = [(p, fn, d) for p, fn, d in record if set(d.values()) != {torch.bfloat16}]
    assert not wrong, wrong[:4]


def test_a_promoted_tangent_pass_is_an_error_naming_pass_dtype_and_shape(monkeypatch):
    """The defect this guards against, planted: an fp32 bias added after the bf16 GEMM."""

    def promoting_linear(x, tx, weight, bias):
        if tx is None:
            return torch.nn.functional.linear(x, weight, bias), None
        y, ty = torch.nn.functional.linear(torch.cat([x, tx.to(x.dtype)]), weight).chunk(2)
        return (y if bias is None else y + bias), ty

    monkeypatch.setattr(tensor_parallel, "linear_with_tangent", promoting_linear)
    teacher, student, fake = _models("plain")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(AttentionFallbackError) as err:
        student_step(RCMConfig(), teacher, student, fake, _batch(), iteration=4)
    msg = str(err.value)
    assert "pass 'student tangent'" in msg and "torch.float32" in msg and "[2, 12, 4, 32]" in msg, msg


def test_outside_training_passes_fp32_is_allowed():
    """Tools and fp32 runs are not training passes under autocast: no error."""
    net = WanDiT(CFG)
    b = _batch()
    with torch.no_grad():
        v, tv = net.forward_with_tangent(b.x0, torch.full((2,), 500.0), b.context, b.x0, torch.ones(2))
    assert v.dtype == tv.dtype == torch.float32
