"""tools/evaluate.py checks every input before sampling and reports progress per batch."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "toy_teacher.pt")
QUICK = ["--num-samples", "8", "--num-reference", "16", "--teacher-steps", "2", "--steps", "1", "--batch-size", "4",
         "--skip-untrained", "--no-plot"]


def evaluate(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), *argv], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.slow
def test_bad_student_is_refused_before_any_sampling(tmp_path):
    p = evaluate(*QUICK, "--student", f"good={TEACHER}", "--student", f"bad={tmp_path}/missing",
                 "--out", str(tmp_path / "r"))
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [f"evaluate.py: error: --student bad={tmp_path}/missing: no such checkpoint directory or model file"]
    assert "samples" not in p.stdout and "teacher" not in p.stdout  # nothing was sampled
    (tmp_path / "garbage").mkdir()
    p = evaluate(*QUICK, "--student", f"g={tmp_path}/garbage", "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and p.stderr.startswith(f"evaluate.py: error: --student g={tmp_path}/garbage: ")
    assert "samples" not in p.stdout and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = evaluate(*QUICK, "--steps", "9", "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and "--steps 9: expected 1..4" in p.stderr and "samples" not in p.stdout


@pytest.mark.slow
def test_progress_line_per_batch(tmp_path):
    p = evaluate(*QUICK, "--student", f"s={TEACHER}", "--out", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr[-2000:]
    for label in ("teacher 2 steps", "s 1 step(s)"):
        assert f"  {label}: 4/8 samples," in p.stdout and f"  {label}: 8/8 samples," in p.stdout and "ETA" in p.stdout
    assert (tmp_path / "r.json").is_file() and "Transformer Engine" not in p.stderr


def test_batching_does_not_change_samples():
    from rcm_megatron.checkpointing.loading import open_model
    from rcm_megatron.eval.toy_benchmark import generate

    model, _ = open_model(TEACHER)
    seen = []
    a, la = generate(model, "student", 6, steps=1, batch_size=4, progress=lambda d, n: seen.append((d, n)))
    b, lb = generate(model, "student", 6, steps=1)
    assert torch.allclose(a, b, atol=1e-4) and torch.equal(la, lb) and seen == [(4, 6), (6, 6)]
    c, _ = generate(model, "teacher", 5, steps=2, cfg_scale=2.0, batch_size=2)
    d, _ = generate(model, "teacher", 5, steps=2, cfg_scale=2.0)
    assert torch.allclose(c, d, atol=1e-4)
