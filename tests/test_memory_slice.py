"""benchmarks/memory_slice.py's CPU path (--tiny): the slice runs every pass of the student and
critic steps, writes the JSON the GPU run writes (card, date, command, each figure's relative
error under a key with 'error' in its name) and prints the table last."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_memory_slice_tiny_writes_errors_and_a_table(tmp_path, capsys):
    import memory_slice

    assert memory_slice.main(["--tiny", "--layers", "1", "--reps", "1", "--out", str(tmp_path)]) == 0
    (name,) = os.listdir(tmp_path)
    assert name.startswith("memory_slice_") and name.endswith("_cpu.json")
    result = json.load(open(tmp_path / name))
    assert {"card", "date", "command", "layout", "states", "passes", "optimizer_step"} <= set(result)
    assert set(result["passes"]["tiny"]) == {"forward", "tangent", "with_grad"}
    for row in result["passes"]["tiny"].values():
        assert row["measured_peak_gib"] > 0 and row["measured_s"] > 0
        assert {"peak_error", "time_error", "time_error_default_rates"} <= set(row)
    # the planner's rates, measured in the same run at the slice's per-rank shapes
    rates = result["rates"]["tiny"]
    assert rates["source"] == "measured in this run" and len(rates["gemm_table"]) == 3  # (D, D), (D, F), (F, D)
    assert all(v > 0 for k, v in rates.items() if k.endswith(("tflops", "gbps")))
    # the states are allocated from the real parameter shapes: the planner counts them within 5%
    assert abs(result["states"]["states_error"]) < 0.05
    for row in result["passes"]["tiny"].values():  # (the tiny model's fixed costs dominate: no bound here)
        assert row["planned_peak_gib"] > 0 and row["peak_error"] == row["peak_error"], row
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("tiny   with_grad") and "error" in out[-4]
