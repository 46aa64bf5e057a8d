"""pretrain_rcm.py --expert-init {low_noise,high_noise} with a two-expert teacher: the named expert
initializes student and fake score (the teacher keeps both experts in place), the checkpoint's
provenance records it, a resume naming the other expert is refused with one line (exit 2), and a bad
value or a one-model teacher exits 2 before any model is built."""

import os

import pytest
import torch

from test_pretrain_experts import BOUNDARY, expert_dir, run

from rcm_megatron.checkpointing.dist_io import read_common
from rcm_megatron.checkpointing.loading import open_source, read_full_state_dict
from rcm_megatron.models import WanExperts

pytestmark = pytest.mark.slow  # builds checkpoints, trains


def expert_weights(root, key):
    with open_source(os.path.join(root, key)) as src:
        return read_full_state_dict(src)


def test_high_noise_init_starts_student_and_fake_score_from_the_high_noise_expert(tmp_path, monkeypatch):
    import pretrain_rcm
    from rcm_megatron.training import trainer as trainer_mod

    ckpt = expert_dir(tmp_path / "wan22")
    built, original = {}, trainer_mod.build_models

    def recording_build(*a, **kw):
        models = original(*a, **kw)
        built["teacher"] = models.teacher
        built["student0"] = {k: v.clone() for k, v in models.student.state_dict().items()}
        built["fake0"] = {k: v.clone() for k, v in models.fake.state_dict().items()}
        return models

    monkeypatch.setattr(trainer_mod, "build_models", recording_build)
    save = tmp_path / "save"
    flags = ["--device", "cpu", "--no-memory-check", "--teacher-checkpoint", ckpt, "--data", "toy-i2v",
             "--method", "rcm", "--student-update-freq", "2", "--micro-batch-size", "2", "--global-batch-size", "2",
             "--log-dir", str(tmp_path / "log"), "--save", str(save)]
    assert pretrain_rcm.main([*flags, "--train-iters", "2", "--expert-init", "high_noise"]) == 0

    high, low = expert_weights(ckpt, "high_noise"), expert_weights(ckpt, "low_noise")
    assert any(not torch.equal(high[k], low[k]) for k in high)  # the two experts differ
    for name in ("student0", "fake0"):  # iteration 0: exactly the high-noise expert
        assert built[name].keys() == high.keys()
        assert all(torch.equal(v, high[k]) for k, v in built[name].items()), name
    teacher = built["teacher"]  # the teacher is unchanged: each expert in its own place
    assert isinstance(teacher, WanExperts) and teacher.boundary_ratio == BOUNDARY
    assert all(torch.equal(v, high[k]) for k, v in teacher.high_noise.state_dict().items())
    assert all(torch.equal(v, low[k]) for k, v in teacher.low_noise.state_dict().items())

    iteration = (save / "latest_checkpointed_iteration.txt").read_text().strip()
    meta = read_common(str(save / f"iter_{int(iteration):07d}"))["meta"]
    assert meta["teacher"]["student_init"] == "high_noise"

    # a resume naming the other expert: one line, exit 2, before any model is built
    p = run("--teacher-checkpoint", ckpt, "--data", "toy-i2v", "--method", "rcm", "--student-update-freq", "2",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "4", "--save", str(save),
            "--load", str(save), "--log-dir", str(tmp_path / "log2"), "--expert-init", "low_noise", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "--expert-init low_noise" in lines[0] and "started from the high_noise expert" in lines[0], lines[0]
    assert os.listdir(tmp_path / "log2") == []  # nothing trained or logged
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == iteration
    assert sorted(os.listdir(save)) == [f"iter_{int(iteration):07d}", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("teacher,value,message", [
    ("experts", "medium", "argument --expert-init: invalid choice: 'medium'"),
    ("one model", "high_noise", "--expert-init high_noise needs a two-expert --teacher-checkpoint"),
])
def test_bad_expert_init_exits_2(teacher, value, message, tmp_path):
    ckpt = expert_dir(tmp_path / "wan22")
    source = ckpt if teacher == "experts" else os.path.join(ckpt, "high_noise")
    p = run("--teacher-checkpoint", source, "--data", "toy-i2v", "--train-iters", "1", "--expert-init", value,
            "--log-dir", str(tmp_path / "log"), check=False)
    assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1], p.stderr
    assert not (tmp_path / "log").exists()  # stopped before any model was built
