"""benchmarks/rcm_step.py records which trainer path it measured (its A/B switches) from the extra flags,
and the trainer accepts the fused-ops switch."""

import importlib.util
import os

from rcm_megatron.training.arguments import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("rcm_step_bench", os.path.join(ROOT, "benchmarks", "rcm_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_path_switches_from_extra_flags():
    bench = load_bench()
    assert bench.path_switches([]) == {"fused_tangent_ops": True, "compile_blocks": "auto", "fp8_teacher": False}
    assert bench.path_switches(["--no-fused-tangent-ops"])["fused_tangent_ops"] is False
    assert bench.path_switches(["--fused-tangent-ops", "--compile-blocks", "on", "--fp8-teacher"]) == \
        {"fused_tangent_ops": True, "compile_blocks": "on", "fp8_teacher": True}
    assert bench.path_switches(["--compile-blocks=auto"])["compile_blocks"] == "auto"


def test_trainer_flag():
    assert build_parser().parse_args(["--fused-tangent-ops"]).fused_tangent_ops
    assert build_parser().parse_args([]).fused_tangent_ops  # default on (measured on H100: docs/performance.md)
    assert not build_parser().parse_args(["--no-fused-tangent-ops"]).fused_tangent_ops
