"""A two-expert teacher (Wan2.2 A14B-style folder: experts.json + high_noise/ + low_noise/) survives a
save and resume: pretrain_rcm.py saved mid-run and resumed with --load logs the same losses, bit for
bit on CPU fp32, as one uninterrupted run (the student and fake score start from the low-noise
expert only at iteration 0; on resume they come from the checkpoint, the teacher again from the
folder, routed by time)."""

import pytest

from test_pretrain import records, run
from test_pretrain_experts import expert_dir

from rcm_megatron.data.toy import TEXT_DIM
from rcm_megatron.models.config import WanConfig

pytestmark = pytest.mark.slow  # three training runs

# the Wan2.2 I2V expert form on toy-i2v (4 noisy + 4 mask + 4 condition channels), as small as it goes
CFG = WanConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, out_channels=4,
                text_dim=TEXT_DIM, freq_dim=32, in_channels=12)
COMMON = ["--data", "toy-i2v", "--device", "cpu", "--no-memory-check", "--method", "rcm", "--student-update-freq", "2",
          "--micro-batch-size", "2", "--global-batch-size", "2", "--rollout-max-steps", "2", "--log-interval", "1"]


def timing(key: str) -> bool:  # wall-clock throughput differs run to run
    return key.endswith("per_sec") or "tflops" in key or key.endswith("_seconds") or key.startswith("time")


def test_two_expert_resume_matches_a_straight_run(tmp_path):
    import shutil

    ckpt_dir = expert_dir(tmp_path / "wan22", cfgs=(CFG, CFG))
    teacher = ["--teacher-checkpoint", ckpt_dir]
    straight = tmp_path / "straight"
    run(*teacher, *COMMON, "--train-iters", "6", "--log-dir", str(straight), "--save", str(straight / "ckpt"),
        "--save-interval", "3")
    a = records(straight)
    assert [r["iteration"] for r in a] == list(range(1, 7))
    assert {"student", "critic"} == {r["phase"] for r in a[3:]}  # both models train after the resume point
    # resume from the straight run's iteration-3 checkpoint alone, its first three metrics lines kept
    resumed, ckpt = tmp_path / "resumed", tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt" / "iter_0000003", ckpt / "iter_0000003")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    run(*teacher, *COMMON, "--train-iters", "6", "--log-dir", str(resumed), "--save", str(ckpt), "--load", str(ckpt))
    b = records(resumed)
    assert [r["iteration"] for r in b] == list(range(4, 7))
    strip = lambda recs: [{k: v for k, v in r.items() if not timing(k)} for r in recs]  # noqa: E731
    assert strip(a[3:]) == strip(b)
    assert all(r["loss"] == r["loss"] for r in b)  # not NaN
