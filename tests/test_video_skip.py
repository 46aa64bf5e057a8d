"""--log-video-interval with --vae when the decode would not fit: the samples are skipped with one
warning line per logged iteration, training goes on, and every iteration's metrics row is written.
A real training process whose fit check sees 1 KiB of free memory (``free_memory_bytes``)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
from test_training_reports import ROOT, assets  # noqa: E402,F401 - the tiny VAE + shards fixture

pytestmark = pytest.mark.slow  # a 4-iteration training subprocess


def test_decode_that_does_not_fit_is_skipped_and_training_continues(assets, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = str(tmp_path / "log")
    argv = ["--model", "tiny", "--device", "cpu", "--log-interval", "1", "--micro-batch-size", "1",
            "--global-batch-size", "1", "--rollout-max-steps", "4", "--student-update-freq", "2",
            "--data", str(assets / "shards"), "--train-iters", "4", "--log-dir", log_dir,
            "--log-video-interval", "2", "--vae", str(assets / "vae"), "--log-video-teacher-steps", "2"]
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from rcm_megatron.training import video_samples\n"
            "video_samples.free_memory_bytes = lambda device: 1024  # 1 KiB free: no decode fits\n"
            f"import pretrain_rcm; sys.exit(pretrain_rcm.main({argv!r}))")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    skipped = [ln for ln in p.stderr.splitlines() if "video samples at iteration" in ln]
    assert len(skipped) == 2, p.stderr[-4000:]
    for it, ln in zip((2, 4), skipped):
        assert ln.startswith(f"warning: video samples at iteration {it} skipped: decoding needs ~")
        assert ln.endswith("0.0 GiB of host memory is free")
    rows = [json.loads(ln) for ln in open(os.path.join(log_dir, "metrics.jsonl")) if ln.strip()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert not acc.Tags()["images"]  # nothing decoded
    assert acc.Tags()["scalars"]  # the scalars of every iteration are there
