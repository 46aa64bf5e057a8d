"""benchmarks/numerics.py on its CPU path (tiny model, fused kernels under the Triton interpreter),
and the query-chunked plain-math tangent reference its fp32 pass runs at 32K tokens."""

import glob
import importlib.util
import json
import math
import os

import pytest
import torch

from rcm_megatron.kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_chunked_reference_equals_whole(monkeypatch):
    torch.manual_seed(0)
    q, k, v, q_tan, k_tan, v_tan = (torch.randn(2, 13, 3, 8, dtype=torch.float64) for _ in range(6))
    whole = reference.attention_with_tangent_reference(q, k, v, q_tan, k_tan, v_tan, kv_len=torch.tensor([13, 5]))
    monkeypatch.setattr(reference, "MAX_SCORES", 2 * 3 * 13 * 4)  # 4 query rows per chunk: 4 chunks, ragged
    chunked = reference.attention_with_tangent_reference(q, k, v, q_tan, k_tan, v_tan, kv_len=torch.tensor([13, 5]))
    for a, b in zip(chunked, whole):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_numerics_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("numerics_bench", os.path.join(ROOT, "benchmarks", "numerics.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "numerics_*.json"))
    result = json.load(open(path))
    assert result["tokens"] == 32 and result["card"] == "cpu"
    rows = result["relative_l2_error_vs_fp32"]
    for name in ("tangent pass bf16, eager, fused kernels", "tangent pass bf16, eager, PyTorch ops"):
        for key in ("F", "dF", "g", "g direction"):
            # bf16 rounding shows (the pass really ran in bf16) and stays at bf16's size
            assert 1e-4 < rows[name][key] < 5e-2, (name, key, rows[name][key])
    assert rows["tangent pass bf16, eager, fused kernels"] != rows["tangent pass bf16, eager, PyTorch ops"]  # the kernels ran
    assert 1e-4 < rows["teacher bf16"]["F"] < 5e-2
    assert rows["teacher fp8"]["F"] > rows["teacher bf16"]["F"] and math.isfinite(rows["teacher fp8"]["F vs bf16"])
    assert rows["teacher fp8"]["F"] < 0.2


def test_numerics_rejects_bad_layers(capsys):
    spec = importlib.util.spec_from_file_location("numerics_bench", os.path.join(ROOT, "benchmarks", "numerics.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as e:
        bench.parse(["--layers", "0"])
    assert e.value.code == 2 and "--layers must be >= 1" in capsys.readouterr().err
