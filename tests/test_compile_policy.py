"""--compile-blocks: one rule for the trainer and the memory planner."""

from types import SimpleNamespace

import pytest

from rcm_megatron.models.config import preset
from rcm_megatron.planning.memory import GIB, pass_memory
from rcm_megatron.planning.search import check_fits, workload_and_layout
from rcm_megatron.training.arguments import parse_args
from rcm_megatron.training.compile_policy import blocks_compiled


@pytest.mark.parametrize("setting,device,tp,cp,gran,want", [
    ("auto", "cuda", 1, 1, "full", True),
    ("auto", "cuda:0", 1, 1, None, True),
    ("auto", "cpu", 1, 1, "full", False),
    ("auto", "cuda", 2, 1, "full", False),
    ("auto", "cuda", 1, 2, "full", False),
    ("auto", "cuda", 1, 1, "selective", False),
    ("on", "cpu", 4, 2, "selective", True),
    ("off", "cuda", 1, 1, "full", False),
])
def test_blocks_compiled_rule(setting, device, tp, cp, gran, want):
    assert blocks_compiled(setting, device, tp, cp, gran) is want


def test_parameter_sharding_stays_eager_under_auto():
    assert not blocks_compiled("auto", "cuda", 1, 1, "full", parameter_sharding=True)
    assert blocks_compiled("on", "cuda", 1, 1, "full", parameter_sharding=True)


def test_unknown_setting_is_an_error():
    with pytest.raises(ValueError, match="--compile-blocks"):
        blocks_compiled("yes", "cuda", 1, 1, None)


def test_default_is_auto_and_cpu_default_run_stays_eager():
    train, *_ = parse_args([])
    assert train.compile_blocks == "auto"
    assert not blocks_compiled(train.compile_blocks, train.device, 1, 1, train.recompute.granularity)


def _args(compile_blocks):
    return SimpleNamespace(micro_batch_size=2, latent_shape=(16, 21, 60, 104), bf16=True,
                           recompute_granularity="full", recompute_num_layers=1, use_distributed_optimizer=False,
                           student_update_freq=5, device="cuda", compile_blocks=compile_blocks, model="wan-1.3b")


def test_compiled_tangent_pass_plans_fewer_temporaries():
    cfg = preset("wan-1.3b")
    eager = pass_memory(*workload_and_layout(_args("off"), cfg, 1))["tangent"]
    fused = pass_memory(*workload_and_layout(_args("auto"), cfg, 1))["tangent"]
    assert fused.transient < 0.5 * eager.transient  # GELU's fp32 tangent temporaries are gone
    assert fused.resident == eager.resident


def test_h100_fit_check_follows_compilation():
    """Wan-1.3B 480p at micro-batch 2 on an 80 GB H100: compiled it ran (68.8 GiB peak allocated,
    benchmarks/results/rcm_step_20261206T043933Z_nvidia-h100-80gb-hbm3.json), eager it ran out of
    memory in the student step's GELU tangent."""
    cfg = preset("wan-1.3b")
    assert check_fits(_args("auto"), cfg, world_size=1, gpu_memory_gib=79.2) is None
    line = check_fits(_args("off"), cfg, world_size=1, gpu_memory_gib=79.2)
    assert line is not None and "GiB" in line
