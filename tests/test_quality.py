"""Quality of distillation on the toy video task (docs/quality.md), reduced to CI size.

Fast checks of the measuring stick itself (the analytic features recover the data's exact
parameters, the metrics see collapse and blur, the Frechet distance matches its closed form),
then a short pure-sCM and a short pure-DMD distillation from the shipped teacher through the
real entry point, whose 1-step students must beat the untrained student (the teacher's
weights sampled in one step, where distillation starts) by a wide margin. The margins were
set from measured runs and checked against planted sign errors in the sCM, DMD and critic
losses (tests/quality_mutants.py; see docs/quality.md, "CI bound").
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rcm_megatron.data.toy import CLASSES, NUM_CLASSES, NUM_MODES, ToyVideoLatents, render_batch
from rcm_megatron.eval.metrics import evaluate_features, frechet_distance
from rcm_megatron.eval.toy_features import FEATURE_NAMES, assign_modes, toy_features, valid_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "toy_teacher.pt")

# CI bounds (docs/quality.md, "CI bound"): after a short run of each loss from the shipped teacher,
# 1-step FD <= ratio x the untrained student's. Measured: sCM 0.33, DMD 0.47; with one loss's sign
# flipped (tests/quality_mutants.py, same runs): sCM 1.50, DMD 1.49, critic 1.44 (worse than untrained).
SHORT_RUNS = {"scm": (60, 0.6), "dmd": (90, 0.75)}  # method: (iterations, FD ratio bound)
NUM_EVAL = 256


def _data(n, seed=3):
    ds = ToyVideoLatents(num_samples=n, seed=seed)
    return ds, ds.batch(range(n))["latents"].double(), ds.class_labels(range(n))


def test_features_recover_the_exact_parameters():
    ds, x, labels = _data(64)
    f = toy_features(x, labels)
    assert f.shape == (64, len(FEATURE_NAMES))
    params = [ds.params(i) for i in range(64)]
    amp = torch.tensor([p["amplitude"] for p in params], dtype=torch.float64)
    torch.testing.assert_close(f[:, 0:3], amp[:, None].expand(-1, 3), atol=1e-6, rtol=0)
    vel = torch.tensor([CLASSES[p["class"]].velocity(p["mode"]) for p in params], dtype=torch.float64)
    torch.testing.assert_close(f[:, 3:5], vel, atol=1e-6, rtol=0)
    pos = torch.tensor([p["position"] for p in params], dtype=torch.float64)
    torch.testing.assert_close(f[:, 5], torch.cos(-2 * math.pi * pos[:, 0] / 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(f[:, 9:13], torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64).expand(64, -1),
                               atol=1e-6, rtol=0)
    mode, dist = assign_modes(f, labels)
    assert mode.tolist() == [p["mode"] for p in params] and float(dist.max()) < 1e-6
    assert valid_mask(f, labels).all()


def test_metrics_see_collapse_blur_and_wrong_class():
    _, x, labels = _data(1024)
    ref = toy_features(*_data(2048, seed=4)[1:]), _data(2048, seed=4)[2]
    good = evaluate_features(toy_features(x, labels), labels, *ref)
    assert good["coverage"] == 1 and good["precision"] == 1 and good["fd"] < 0.1
    assert abs(good["diversity"] - 1) < 0.1 and good["mode_entropy"] > 0.98
    # mode collapse: every video moves like mode 0 of its class
    params = [{**ToyVideoLatents(seed=3).params(i), "mode": 0} for i in range(1024)]
    collapsed = evaluate_features(toy_features(render_batch(params), labels), labels, *ref)
    assert collapsed["coverage"] == 1 / NUM_MODES and collapsed["mode_entropy"] == 1 / NUM_MODES
    assert collapsed["precision"] == 1 and collapsed["fd"] > 10 * good["fd"] and collapsed["diversity"] < 0.9
    # lost fine detail: the k_3 wave halved (low-pass), everything else intact
    blurred = x.clone()
    for c, cls in enumerate(CLASSES):
        sel = labels == c
        y = torch.fft.fft2(blurred[sel])
        kh, kw = cls.wavevectors[2]
        y[..., kh % 8, kw % 8] *= 0.5
        y[..., -kh % 8, -kw % 8] *= 0.5
        blurred[sel] = torch.fft.ifft2(y).real
    lowpass = evaluate_features(toy_features(blurred, labels), labels, *ref)
    assert lowpass["precision"] == 0 and lowpass["fd"] > 5 * good["fd"]
    # wrong class: conditioning ignored
    wrong = evaluate_features(toy_features(x, (labels + 1) % NUM_CLASSES), labels, *ref)
    assert wrong["precision"] == 0 and wrong["fd"] > 100 * good["fd"]


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(200000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    # N(0, I) vs N(1, diag(1, 4, 0.25)): 3 + sum (1 + s^2 - 2 s) = 3 + 0 + 1 + 0.25
    assert frechet_distance(a, b) == pytest.approx(4.25, abs=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def _run(*args, script=("pretrain_rcm.py",)):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *[os.path.join(ROOT, s) if s.endswith(".py") else s for s in script], *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def distill_args(log_dir, method, iters):
    """A CI distillation from the shipped teacher with the toy defaults (docs/quality.md), micro-batch 8."""
    return ["--teacher-checkpoint", TEACHER, "--data", "toy", "--method", method, "--train-iters", str(iters),
            "--micro-batch-size", "8", "--log-interval", "10", "--log-dir", str(log_dir),
            "--save", str(os.path.join(log_dir, "ckpt"))]


def one_step(path, ref, which="ema"):
    from rcm_megatron.checkpointing.loading import open_model
    from rcm_megatron.eval.toy_benchmark import evaluate_model

    model, _ = open_model(path, weights=which)
    return evaluate_model(model, "student", ref, NUM_EVAL, steps=1)


@pytest.fixture(scope="module")
def reference_and_untrained():
    from rcm_megatron.eval.toy_benchmark import reference_features

    ref = reference_features(2048)
    return ref, one_step(TEACHER, ref)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(TEACHER), reason="assets/toy_teacher.pt is not in this checkout")
@pytest.mark.parametrize("method", sorted(SHORT_RUNS))
def test_short_distillation_improves_one_step_fd(method, tmp_path, reference_and_untrained):
    """sCM alone checks the sCM loss; DMD alone checks the DMD and critic losses (a sign error in
    any of them makes the 1-step student worse than where it started)."""
    ref, untrained = reference_and_untrained
    iters, ratio = SHORT_RUNS[method]
    _run(*distill_args(tmp_path, method, iters))
    with open(tmp_path / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert len(recs) == iters and all(r["skipped_steps"] == 0 and math.isfinite(r["loss"]) for r in recs)
    student = one_step(str(tmp_path / "ckpt"), ref)
    summary = (f"{method}: untrained 1-step FD {untrained['fd']:.3f}, after {iters} iterations {student['fd']:.3f} "
               f"(bound x{ratio}: {ratio * untrained['fd']:.3f})")
    print(summary)
    assert student["fd"] <= ratio * untrained["fd"], summary
    if method == "scm":  # the exported EMA (tools/export_teacher.py) is the same model as the checkpoint's
        out = tmp_path / "student.pt"
        _run(str(tmp_path / "ckpt"), str(out), script=(os.path.join("tools", "export_teacher.py"),))
        assert one_step(str(out), ref)["fd"] == student["fd"]
