"""pretrain_rcm.py on webdataset shards: trains, logs sample grids, and a DP = 2 run that is
pre-empted and resumed logs exactly the losses of a straight DP = 1 run (the loader's
position is part of the checkpoint)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("webdataset")
from rcm_megatron.data.shards import ShardWriter, shard_name, write_dataset_meta, write_negative_context  # noqa: E402

pytestmark = pytest.mark.slow  # pretrain_rcm.py under torchrun on shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 1, 4, 4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    g = torch.Generator().manual_seed(0)
    write_dataset_meta(str(root), {"latent_shape": SHAPE, "text_len": 6, "text_dim": 64, "latent_dtype": "float32"})
    write_negative_context(str(root), torch.randn(6, 64, generator=g), "blurry")
    i = 0
    for s in range(3):
        with ShardWriter(os.path.join(root, shard_name(s)), latent_dtype=torch.float32) as w:
            for _ in range(5):
                w.write(f"s{i:06d}", torch.randn(SHAPE, generator=g), torch.randn(4 + i % 3, 64, generator=g),
                        f"prompt {i}")
                i += 1
    return root


def run(nproc, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, "pretrain_rcm.py"), "--model", "tiny", "--log-interval", "1", "--micro-batch-size", "1",
           "--global-batch-size", "2", "--rollout-max-steps", "2", "--student-update-freq", "2", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    return p


def losses(d):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss") or k == "iteration"}
            for line in open(os.path.join(d, "metrics.jsonl"))]


def test_train_on_shards_and_resume_at_another_dp_size(shards, tmp_path):
    straight = tmp_path / "straight"
    run(1, "--data", str(shards), "--train-iters", "10", "--log-dir", str(straight), "--log-images-interval", "5")
    rows = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    assert len(rows) == 10 and rows[-1]["bad_samples"] == 0
    assert {"tokens_per_sec", "model_tflops_per_gpu"} <= set(rows[-1])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(straight), size_guidance={"images": 0})
    ev.Reload()
    assert {"samples/data", "samples/student_1step", "samples/student_2step"} <= set(ev.Tags()["images"])
    # 10 iterations x 2 samples cross the 15-sample epoch boundary; DP = 2, saved at 4, resumed.
    log, ck = tmp_path / "resumed", tmp_path / "ckpt"
    run(2, "--data", str(shards), "--train-iters", "4", "--log-dir", str(log), "--save", str(ck))
    run(2, "--data", str(shards), "--train-iters", "10", "--log-dir", str(log), "--save", str(ck), "--load", str(ck))
    a, b = losses(straight), losses(log)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4), (x["iteration"], k)
