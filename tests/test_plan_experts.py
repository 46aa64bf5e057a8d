"""The memory plan of a two-expert teacher (Wan2.2 A14B) holds both experts' weights on every rank."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rcm_megatron.models import preset
from rcm_megatron.planning.layout import Layout, Workload
from rcm_megatron.planning.memory import plan_memory
from rcm_megatron.planning.params import count, stage_shapes
from rcm_megatron.planning.search import workload_and_layout
from rcm_megatron.training.preflight import data_plan_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("zero,fp8", [(0, False), (1, False), (1, True)])
def test_second_expert_adds_one_teacher(zero, fp8):
    cfg = preset("wan-14b")
    one, two = (Workload(cfg, (16, 21, 60, 104), bf16=True, fp8_teacher=fp8, teacher_experts=n) for n in (1, 2))
    lay = Layout(dp=8, zero=zero)
    a, b = plan_memory(one, lay), plan_memory(two, lay)
    teacher = a.states["teacher"]
    p32, p16 = count(stage_shapes(cfg, 1, True, True, (0, cfg.num_layers), True))
    assert teacher <= 2 * p16 + 4 * p32 and teacher > (0.6 if fp8 else 0.99) * (2 * p16 if not fp8 else p16)
    assert b.states["teacher"] == pytest.approx(2 * teacher)
    assert b.peak - a.peak >= teacher  # the peak adds it (and the allocator's share of it)
    assert {k: v for k, v in b.states.items() if k != "teacher"} == {k: v for k, v in a.states.items() if k != "teacher"}


def test_bad_expert_count():
    with pytest.raises(ValueError, match="teacher_experts must be 1 or 2"):
        Workload(preset("tiny"), (16, 2, 4, 4), teacher_experts=3)


def test_preflight_flags_carry_the_experts():
    from rcm_megatron.training.arguments import parse_args

    train, _, rcm_cfg, par = parse_args(["--model", "tiny", "--data", "synthetic", "--latent-shape", "16", "2", "4", "4"])
    dataset = SimpleNamespace(latent_shape=(16, 2, 4, 4), text_len=8)
    for experts, n in ((None, 1), (object(), 2)):
        flags = data_plan_flags(train, rcm_cfg, par, dataset, experts)
        w, _ = workload_and_layout(flags, preset("tiny"), 1)
        assert w.teacher_experts == n


def test_plan_memory_tool_flag():
    out = [subprocess.run([sys.executable, "tools/plan_memory.py", "--model", "wan-14b", "--gpus", "8",
                           "--gpu-memory-gib", "80", "--latent-shape", "16", "21", "60", "104",
                           "--teacher-experts", str(n), "--top", "1"], capture_output=True, text=True, check=False, cwd=ROOT)
           for n in (1, 2)]
    assert all(o.returncode in (0, 1) for o in out), [o.stderr for o in out]
    assert out[0].stdout != out[1].stdout


def test_preflight_flags_carry_the_fp8_teacher():
    """The pre-build memory check plans the teacher --fp8-teacher builds (it planned a bf16 teacher)."""
    from rcm_megatron.training.arguments import parse_args

    argv = ["--model", "tiny", "--data", "synthetic", "--latent-shape", "16", "2", "4", "4", "--fp8-teacher",
            "--first-last-layers-bf16"]
    train, _, rcm_cfg, par = parse_args(argv)
    flags = data_plan_flags(train, rcm_cfg, par, SimpleNamespace(latent_shape=(16, 2, 4, 4), text_len=8))
    w, _ = workload_and_layout(flags, preset("tiny"), 1)
    assert w.fp8_teacher and w.first_last_layers_bf16
