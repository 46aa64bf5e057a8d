"""pretrain_rcm.py --teacher-checkpoint DIR with a two-expert (Wan2.2 A14B) checkpoint as
tools/convert_checkpoint.py import writes it (experts.json + high_noise/ + low_noise/): the teacher is a
WanExperts routed by time, the student and fake score one network from the low-noise expert; rCM trains
with teacher calls reaching both experts. Bad input exits 2 with one line before any model is built."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rcm_megatron.checkpointing.loading import open_source
from rcm_megatron.checkpointing.model_file import save_model_file
from rcm_megatron.checkpointing.model_writer import write_model_checkpoint
from rcm_megatron.data.toy import TEXT_DIM
from rcm_megatron.models import WanDiT, WanExperts
from rcm_megatron.models.config import WanConfig

pytestmark = pytest.mark.slow  # builds checkpoints, trains

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = WanConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, out_channels=4,
                text_dim=TEXT_DIM, freq_dim=32, in_channels=12)  # the Wan2.2 I2V expert form on toy-i2v
BOUNDARY = 0.9


def expert_dir(root, seeds=(0, 1), cfgs=(CFG, CFG), ratio=BOUNDARY):
    """A two-expert checkpoint folder, each expert written as convert_checkpoint import writes it."""
    os.makedirs(root, exist_ok=True)
    for key, seed, cfg in zip(("high_noise", "low_noise"), seeds, cfgs):
        m = WanDiT(cfg)
        m.reset_parameters(seed)
        f = os.path.join(root, f"{key}.pt")
        save_model_file(f, cfg.to_dict(), m.state_dict())
        with open_source(f) as src:
            write_model_checkpoint(os.path.join(root, key), src, torch.float32)
        os.remove(f)
    with open(os.path.join(root, "experts.json"), "w") as f:
        json.dump({"boundary_ratio": ratio, "high_noise": "high_noise", "low_noise": "low_noise"}, f)
    return str(root)


def run(*args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_rcm.py"), "--device", "cpu", "--no-memory-check",
                        *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_rcm_trains_against_both_experts(tmp_path, monkeypatch):
    """In-process main(): hooks count the teacher's calls per expert; the student starts as the
    low-noise expert, the teacher routes by time exactly as each expert alone."""
    import pretrain_rcm
    from rcm_megatron.rcm.trigflow import predict
    from rcm_megatron.training import trainer as trainer_mod

    ckpt = expert_dir(tmp_path / "wan22")
    calls, built = {"high_noise": 0, "low_noise": 0}, {}
    original = trainer_mod.build_models

    def counting_build(*a, **kw):
        models = original(*a, **kw)
        built["models"] = models
        built["student0"] = {k: v.clone() for k, v in models.student.state_dict().items()}
        for key in calls:
            getattr(models.teacher, key).register_forward_hook(lambda *_, k=key: calls.__setitem__(k, calls[k] + 1))
        return models

    monkeypatch.setattr(trainer_mod, "build_models", counting_build)
    log = tmp_path / "log"
    rc = pretrain_rcm.main(["--device", "cpu", "--no-memory-check", "--teacher-checkpoint", ckpt, "--data", "toy-i2v",
                            "--method", "rcm", "--train-iters", "4", "--student-update-freq", "2",
                            "--micro-batch-size", "4", "--global-batch-size", "4", "--log-dir", str(log)])
    assert rc == 0
    teacher = built["models"].teacher
    assert isinstance(teacher, WanExperts) and teacher.boundary_ratio == BOUNDARY
    assert calls["high_noise"] > 0 and calls["low_noise"] > 0, calls
    recs = [json.loads(line) for line in open(log / "metrics.jsonl")]
    assert len(recs) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    # the teacher's output at TrigFlow times on each side of the boundary is that expert's output
    tb = float(torch.atan(torch.tensor(BOUNDARY / (1 - BOUNDARY))))
    x = torch.randn(2, 4, 2, 4, 4)
    cond = torch.randn(2, 8, 2, 4, 4)
    ctx = torch.randn(2, 8, TEXT_DIM)
    from rcm_megatron.rcm.conditioning import Conditioning

    c = Conditioning(concat=cond)
    with torch.no_grad():
        for t_val, expert in ((tb + 0.02, teacher.high_noise), (tb - 0.02, teacher.low_noise)):
            t = torch.full((2,), t_val)
            torch.testing.assert_close(predict(teacher, x, t, ctx, c).x0, predict(expert, x, t, ctx, c).x0)
    # the student started as the low-noise expert (not the high-noise one)
    low, high = teacher.low_noise.state_dict(), teacher.high_noise.state_dict()
    assert all(torch.equal(v, low[k]) for k, v in built["student0"].items())
    assert not all(torch.equal(v, high[k]) for k, v in built["student0"].items())


@pytest.mark.parametrize("case,message", [
    ("missing", "the low_noise expert .*low_noise is missing"),
    ("architectures", "the two experts differ in architecture"),
    ("boundary", r"boundary_ratio must be in \(0, 1\), got 1.5"),
    ("fsdp", "two-expert teacher .*--use-torch-fsdp2 does not support"),
])
def test_bad_expert_checkpoint_exits_2(case, message, tmp_path):
    import re
    import shutil

    root = tmp_path / "wan22"
    extra = []
    if case == "architectures":
        expert_dir(root, cfgs=(CFG, CFG.replace(num_layers=1)))
    else:
        expert_dir(root, ratio=1.5 if case == "boundary" else BOUNDARY)
    if case == "missing":
        shutil.rmtree(root / "low_noise")
    if case == "fsdp":
        extra = ["--use-torch-fsdp2"]
    p = run("--teacher-checkpoint", str(root), "--data", "toy-i2v", "--train-iters", "1", *extra,
            "--log-dir", str(tmp_path / "log"), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), p.stderr
    assert not (tmp_path / "log").exists()  # nothing written: stopped before any model was built
