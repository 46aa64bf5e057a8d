"""benchmarks/recompute.py runs every recompute choice end to end on its CPU path (the tiny model)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recompute_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("recompute_bench", os.path.join(ROOT, "benchmarks", "recompute.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--layers", "2", "--reps", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("recompute_*.json")
    rows = {r["choice"]: r for r in json.load(open(path))["rows"]}
    assert set(rows) == {"full", "selective", "selective + core_attn", "none"}  # compiled rows: CUDA only
    assert all(r["ms"] > 0 and "error" not in r for r in rows.values())
    assert rows["full"]["time_vs_full"] == 1.0
