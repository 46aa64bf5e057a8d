"""pretrain_rcm.py end to end on CPU: bad input exits 2 before any model is built,
metrics.jsonl is complete, resume reproduces a straight run bit for bit; the flag-less
default resolves to the shipped toy teacher on the toy task.

The end-to-end runs pass ``--model tiny`` (random tiny teacher, synthetic data) so they stay
fast and independent of the shipped teacher; the defaults are checked in-process."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # every test runs pretrain_rcm.py in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_rcm.py"), *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def records(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("args,message", [
    (["--latent-shape", "4", "3", "8", "8"], "latents have 4 channels, the model expects in_channels=16"),
    (["--latent-shape", "16", "3", "7", "8"], "latent H=7 is not divisible by the patch size 2"),
    (["--teacher-checkpoint", "/no/such/teacher.pt"], "--teacher-checkpoint /no/such/teacher.pt: no such file"),
    (["--model", "wan-15b"], "invalid choice: 'wan-15b'"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], "--global-batch-size 3 must be a positive multiple"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be a positive integer"),
    (["--tensor-model-parallel-size", "3"], "not divisible by tensor (3)"),
    (["--p-g", "lognormal(0.7)"], "lognormal expects 2 parameter(s)"),
    (["--load", "/no/such/ckpt"], "--load /no/such/ckpt: no such checkpoint directory"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    tiny = [] if "--model" in args or "--teacher-checkpoint" in args else ["--model", "tiny"]
    p = run(*tiny, *args, "--train-iters", "1", "--log-dir", str(tmp_path / "log"), check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "log" / "metrics.jsonl")  # nothing ran


def test_text_dim_mismatch_in_data_file(tmp_path):
    path = tmp_path / "data.pt"
    torch.save({"latents": torch.randn(4, 16, 1, 4, 4), "context": torch.randn(4, 5, 32),
                "negative_context": torch.randn(5, 32)}, path)
    p = run("--model", "tiny", "--data", str(path), "--train-iters", "1", "--log-dir", str(tmp_path / "log"),
            check=False)
    assert p.returncode == 2 and "text embeddings have width 32, the model expects text_dim=64" in p.stderr


def test_corrupt_teacher_file(tmp_path):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a checkpoint")
    p = run("--teacher-checkpoint", str(bad), "--train-iters", "1", "--log-dir", str(tmp_path / "l"), check=False)
    assert p.returncode == 2 and str(bad) in p.stderr


def test_metrics_and_exact_resume(tmp_path):
    common = ["--model", "tiny", "--train-iters", "8", "--student-update-freq", "2", "--tangent-warmup-iters", "2", "--log-interval", "1",
              "--micro-batch-size", "1", "--global-batch-size", "2", "--rollout-max-steps", "2"]
    straight = tmp_path / "straight"
    run(*common, "--log-dir", str(straight))
    a = records(straight)
    assert [r["iteration"] for r in a] == list(range(1, 9))
    assert [r["phase"] for r in a] == ["student", "student", "critic", "student", "critic", "student", "critic",
                                       "student"]
    for r in a:
        assert {"iteration", "phase", "grad_norm", "lr", "samples_per_sec"} <= set(r)
        assert any(k.startswith("loss_") for k in r)
    assert "loss_scm" in a[3] and "loss_dmd" in a[3] and "loss_critic" in a[2]
    assert os.listdir(straight) and any(f.startswith("events.out.tfevents") for f in os.listdir(straight))

    resumed, ckpt = tmp_path / "resumed", tmp_path / "ckpt"
    half = [c if c != "8" else "4" for c in common]
    run(*half, "--log-dir", str(resumed), "--save", str(ckpt))
    run(*common, "--log-dir", str(resumed), "--save", str(ckpt), "--load", str(ckpt))
    b = records(resumed)
    def timing(k):  # wall-clock throughput (samples/tokens per second, model TFLOP/s) differs run to run
        return k.endswith("per_sec") or "tflops" in k or k.endswith("_seconds") or k.startswith("time")

    strip = [{k: v for k, v in r.items() if not timing(k)} for r in a]
    assert strip == [{k: v for k, v in r.items() if not timing(k)} for r in b]


def test_teacher_mode_learns(tmp_path):
    run("--model", "tiny", "--mode", "teacher", "--train-iters", "30", "--log-dir", str(tmp_path), "--global-batch-size", "4",
        "--teacher-lr", "2e-3")
    r = records(tmp_path)
    first = sum(x["loss_flow_matching"] for x in r[:5]) / 5
    last = sum(x["loss_flow_matching"] for x in r[-5:]) / 5
    assert last < 0.9 * first


# ---------------------------------------------------------------- defaults (issue 10)


def test_default_distills_the_shipped_toy_teacher():
    from rcm_megatron.training import arguments as A

    train, model_cfg, rcm_cfg, _ = A.parse_args([])
    assert os.path.isfile(A.DEFAULT_TEACHER), "assets/toy_teacher.pt must ship with the repository"
    assert train.teacher_checkpoint == A.DEFAULT_TEACHER and model_cfg is None  # config comes from the file
    assert train.data == "toy" and train.mode == "distill"
    assert train.save == os.path.join("runs/default", "checkpoints")
    assert train.train_iters == A.TOY_TRAIN_DEFAULTS["train_iters"]
    for key, value in A.TOY_DEFAULTS.items():
        assert getattr(rcm_cfg, key) == value, key
    # explicit flags still win over the toy defaults
    _, _, rcm_cfg, _ = A.parse_args(["--cfg-scale", "3.5", "--lr", "1e-5"])
    assert rcm_cfg.cfg_scale == 3.5 and rcm_cfg.lr_student == 1e-5


def test_model_tiny_keeps_the_random_teacher_on_synthetic_data():
    from rcm_megatron.training import arguments as A

    train, model_cfg, rcm_cfg, par = A.parse_args(["--model", "tiny"])
    assert train.teacher_checkpoint is None and model_cfg == A.preset("tiny")
    assert train.data is None and train.save is None
    assert train.train_iters == 100 and par.micro_batch_size == 2
    assert rcm_cfg.lr_student == 1e-4 and rcm_cfg.cfg_scale == 5.0


def test_teacher_mode_defaults_to_the_toy_preset():
    from rcm_megatron.training import arguments as A

    train, model_cfg, _, _ = A.parse_args(["--mode", "teacher"])
    assert model_cfg == A.preset("toy") and train.data == "toy" and train.teacher_checkpoint is None


def test_missing_shipped_teacher_fails_with_a_clear_message(monkeypatch, tmp_path):
    from rcm_megatron.training import arguments as A

    monkeypatch.setattr(A, "DEFAULT_TEACHER", str(tmp_path / "toy_teacher.pt"))
    with pytest.raises(A.ArgumentError, match="default teacher .*toy_teacher.pt is missing"):
        A.parse_args([])
    A.parse_args(["--model", "tiny"])  # the random-teacher path does not need the file
