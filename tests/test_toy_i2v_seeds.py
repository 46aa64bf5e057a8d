"""benchmarks/toy_i2v_seeds.py --tiny (the reduced CI check of the multi-seed toy I2V result): two
seeds distilled with the real trainer, the student evaluated per seed, the spread and the targets
computed from the per-seed rows; a rerun reuses the seeds' checkpoints and, with --teacher-result,
the recorded teacher rows, and gives the same numbers (the evaluation is deterministic)."""

import importlib.util
import json
import os
import statistics

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("toy_i2v_seeds", os.path.join(ROOT, "benchmarks", "toy_i2v_seeds.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_toy_i2v_seeds_tiny(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "run"
    assert bench.main(["--task", "i2v", "--tiny", "--seeds", "0", "1", "--out", str(out)]) == 0
    res = json.loads((out / "toy_i2v_seeds.json").read_text())
    assert [r["seed"] for r in res["per_seed"]] == [0, 1] and res["machine"] == "CPU"
    assert all(r["distill_s"] > 0 for r in res["per_seed"])
    fds = [r["rows"]["rcm_4step"]["fd"] for r in res["per_seed"]]
    assert fds[0] != fds[1]  # two seeds, two students
    row = res["rows"]["rcm_4step"]["fd"]
    assert row["mean"] == pytest.approx(statistics.mean(fds)) and row["std"] == pytest.approx(statistics.stdev(fds))
    ratios = [r["rows"]["rcm_4step"]["fd"] / r["rows"]["teacher"]["fd"] for r in res["per_seed"]]
    assert res["ratios"]["fd_4step_over_teacher"]["mean"] == pytest.approx(statistics.mean(ratios))
    assert res["targets"]["fd_met_seeds"] == sum(x <= 2 for x in ratios) and res["targets"]["seeds"] == 2
    # a rerun: nothing distilled again, the teacher's rows taken from the first result, the same numbers
    again = tmp_path / "again.json"
    assert bench.main(["--task", "i2v", "--tiny", "--seeds", "0", "1", "--out", str(out), "--teacher-result",
                       str(out / "toy_i2v_seeds.json"), "--result", str(again)]) == 0
    res2 = json.loads(again.read_text())
    assert all(r["distill_s"] is None for r in res2["per_seed"])
    assert [r["rows"] for r in res2["per_seed"]] == [r["rows"] for r in res["per_seed"]]
