"""The memory planner against reality: parameter shapes and model-state bytes equal the tensors
the trainer builds; activation estimates within 10% of measured saved-tensor bytes and live
peaks; the CLI and the pre-flight check."""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

from rcm_megatron.kernels.dispatch import attention_backend
from rcm_megatron.models import WanDiT
from rcm_megatron.models.config import preset
from rcm_megatron.parallel.config import ParallelConfig
from rcm_megatron.planning.activations import RankShape, no_grad_pass, with_grad_pass
from rcm_megatron.planning.layout import Layout, Workload
from rcm_megatron.planning.measure import LiveTensorPeak, fused_attention_outputs_only, saved_tensor_bytes
from rcm_megatron.planning.memory import GIB, model_states
from rcm_megatron.planning.params import stage_shapes
from rcm_megatron.planning.search import check_fits
from rcm_megatron.rcm.ema import PowerEMA, partition_names

sys.path.insert(0, os.path.dirname(__file__))
from distributed_utils import run_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shapes_of(model, bf16=True):
    if bf16:
        model.to_dtype(torch.bfloat16)
    return {n: (tuple(p.shape), p.dtype == torch.float32 and bf16) for n, p in model.named_parameters()}


def _planned(cfg, tp, pre, post, rng, bf16=True):
    return {n: (s.shape, s.keep_fp32) for n, s in stage_shapes(cfg, tp, pre, post, rng, bf16).items()}


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_stage_shapes_equal_built_models(name):
    cfg = preset(name).replace(num_layers=4)
    for pre, post, rng in ((True, True, (0, 4)), (True, False, (0, 2)), (False, True, (2, 4))):
        built = _shapes_of(WanDiT(cfg, pre_process=pre, post_process=post, layer_range=rng))
        planned = _planned(cfg, 1, pre, post, rng)
        assert list(built) == list(planned)  # same names, same order
        assert built == planned


def _tp2_shapes():
    return _shapes_of(WanDiT(preset("tiny")))


@pytest.mark.slow
def test_stage_shapes_equal_built_models_at_tp2():
    out = run_distributed(_tp2_shapes, 2, ParallelConfig(tensor_model_parallel_size=2))
    planned = _planned(preset("tiny"), 2, True, True, (0, 2))
    assert out[0] == planned and out[1] == planned


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def test_model_state_bytes_equal_the_trainers_tensors():
    """zero 0 (the trainer's AdamW path) and the teacher: every byte counted; the EMA share of the
    largest DP x CP part equals the shadow tensors PowerEMA keeps for it."""
    cfg = preset("tiny")
    w = Workload(cfg, (16, 2, 4, 4), text_len=8, bf16=True)
    teacher = WanDiT(cfg).to_dtype(torch.bfloat16)
    student = WanDiT(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.0, 0.999))
    student(torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 64)).square().sum().backward()
    opt.step()
    for n in (1, 2, 3):
        lay = Layout(dp=n, zero=0)
        gpu, _ = model_states(w, lay)
        assert gpu["teacher"] == _tensor_bytes(teacher.parameters())
        assert gpu["student_params"] == _tensor_bytes(student.parameters())
        assert gpu["student_grads"] == _tensor_bytes(p.grad for p in student.parameters())
        moments = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
        assert gpu["student_optimizer"] == _tensor_bytes(moments)
        sizes = {k: p.numel() for k, p in student.named_parameters()}
        shares = [_tensor_bytes(PowerEMA(student, names=part).shadow.values()) for part in partition_names(sizes, n)]
        assert gpu["student_ema"] == max(shares)
    bf16_student = WanDiT(cfg).to_dtype(torch.bfloat16)
    gpu, host = model_states(w, Layout(dp=2, zero=1, optimizer_cpu_offload=True))
    assert gpu["student_params"] == _tensor_bytes(bf16_student.parameters())  # megatron keeps bf16 params
    assert gpu["student_grads"] == 4 * sum(p.numel() for p in bf16_student.parameters())  # fp32 grad buffer
    n16 = sum(p.numel() for p in bf16_student.parameters() if p.dtype == torch.bfloat16)
    assert host["student_optimizer"] == (4 * n16 + 8 * sum(p.numel() for p in bf16_student.parameters())) / 2


def _measure(cfg, grid):
    """Measured peaks of a forward, a tangent pass and with-grad passes (recompute off / on)."""
    torch.manual_seed(0)
    m = WanDiT(cfg).to_dtype(torch.bfloat16)
    t, h, w = grid
    lat = torch.randn(1, cfg.in_channels, t, 2 * h, 2 * w, dtype=torch.bfloat16)
    ts, ctx = torch.tensor([500.0]), torch.randn(1, 32, cfg.text_dim, dtype=torch.bfloat16)
    out = {}
    with torch.no_grad():
        with attention_backend("triton"):  # CPU: SDPA's flash kernel, which saves what the GPU's does
            tracker = LiveTensorPeak.for_model(m)
            with tracker:
                m(lat, ts, ctx)
            out["forward"] = tracker.peak
        with attention_backend("reference"):
            tracker = LiveTensorPeak.for_model(m)
            with tracker, fused_attention_outputs_only(tracker):
                m.forward_with_tangent(lat, ts, ctx, lat, ts)
            out["tangent"] = tracker.peak
    m.requires_grad_(True)
    for recompute in (0, 1):
        m.set_activation_recompute(recompute)
        with attention_backend("triton"):
            tracker = LiveTensorPeak.for_model(m)
            with tracker:
                with saved_tensor_bytes(list(m.parameters())) as saved:
                    y = m(lat, ts, ctx)
                y.float().square().sum().backward()
        out[f"saved_{recompute}"], out[f"with_grad_{recompute}"] = saved["bytes"], tracker.peak
        m.zero_grad(set_to_none=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("width,ffn,heads,frames", [(256, 1536, 4, 4), (512, 1024, 8, 4)])
def test_activation_estimates_within_10_percent(width, ffn, heads, frames):
    """bf16 on CPU, 2 blocks of 400 tokens: what each block saves for backward, and the peaks of
    a forward, a tangent pass and a with-grad pass with and without recompute."""
    cfg = preset("tiny").replace(num_layers=2, hidden_size=width, ffn_hidden_size=ffn, num_attention_heads=heads)
    r = RankShape(1, frames * 10 * 10, 32)
    got = _measure(cfg, (frames, 10, 10))
    want = {"forward": no_grad_pass(cfg, r, False).peak, "tangent": no_grad_pass(cfg, r, True).peak,
            "saved_0": with_grad_pass(cfg, r, 2, 0).resident}
    for recompute in (0, 1):
        want[f"with_grad_{recompute}"] = with_grad_pass(cfg, r, 2, recompute).peak
    for k, v in want.items():
        assert abs(v / got[k] - 1) <= 0.10, (k, v, got[k])


@pytest.mark.slow
def test_plan_memory_cli_marks_a_fitting_best_layout(capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import plan_memory

    assert plan_memory.main(["--model", "wan-14b", "--gpus", "8", "--gpu-memory-gib", "80",
                             "--latent-shape", "16", "21", "60", "104", "--top", "3"]) == 0
    out = capsys.readouterr().out
    best = [line for line in out.splitlines() if line.startswith("*")]
    assert len(best) == 1 and "--use-torch-fsdp2" in best[0] or "--use-distributed-optimizer" in best[0]
    headroom = int(best[0].split("%")[0].split()[-1])
    assert headroom >= 10
    assert plan_memory.main(["--model", "wan-14b", "--gpus", "8", "--gpu-memory-gib", "80",
                             "--latent-shape", "16", "21", "60", "103"]) == 2
    assert "W=103" in capsys.readouterr().err


def _args(**kw):
    base = dict(model="wan-14b", bf16=True, tensor_model_parallel_size=1, context_parallel_size=1,
                pipeline_model_parallel_size=1, micro_batch_size=1, global_batch_size=8,
                latent_shape=[16, 21, 60, 104], use_distributed_optimizer=False, recompute_granularity=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.slow
def test_check_fits_names_need_available_and_a_fitting_layout():
    line = check_fits(_args(), world_size=8, gpu_memory_gib=80)
    assert line is not None and "GiB per GPU" in line and "80.0 GiB" in line and "fits: --tensor-model" in line
    assert "\n" not in line
    assert check_fits(_args(no_memory_check=True), world_size=8, gpu_memory_gib=80) is None
    fitting = line.split("fits: ")[1].split(" (")[0].split()
    flags = {}
    for i, tok in enumerate(fitting):
        if tok.startswith("--"):
            value = fitting[i + 1] if i + 1 < len(fitting) and not fitting[i + 1].startswith("--") else True
            flags[tok[2:].replace("-", "_")] = int(value) if isinstance(value, str) and value.isdigit() else value
    assert check_fits(_args(**flags), world_size=8, gpu_memory_gib=80) is None
    assert GIB == 1024 ** 3


def test_check_fits_on_cpu_uses_host_memory(monkeypatch):
    """A CPU run is checked against the host's RAM per local rank: the tiny model fits, Wan-14B with
    no sharding on 2 ranks of this host does not."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = _args(model="tiny", latent_shape=[16, 2, 4, 4], device="cpu", bf16=False)
    assert check_fits(args, world_size=2) is None
    line = check_fits(_args(device="cpu"), world_size=2)
    assert line is not None and "host RAM per rank" in line
