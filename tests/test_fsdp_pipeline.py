"""ZeRO-3 (--use-torch-fsdp2) with pipeline parallelism under torchrun on gloo CPU ranks: DP2 x PP2
logs the losses and gradient norms of the unsharded single-process run through student (sCM,
sCM + DMD) and critic steps, with student rollouts whose lengths differ per data-parallel rank;
its checkpoint resumes at DP2 without PP (ZeRO-3 over a group of two) where the straight run goes
on, and the EMA (kept as the student's ZeRO-3 shards) equals the uninterrupted run's, at the end
of the sharded run and after the resume."""

import shutil

import pytest
import torch

from test_parallel_training import _ema, assert_same_losses, grad_norms, losses, torchrun

pytestmark = pytest.mark.slow  # pretrain_rcm.py under torchrun

# 4 blocks (2 per stage), 2 micro-batches per DP rank at DP2, the critic and the DMD step from
# iteration 2 on (tangent warmup of 1), rollouts of 1 or 2 steps drawn per sample.
FLAGS = ["--model", "tiny-4l", "--global-batch-size", "4", "--clip-grad", "1e4", "--tangent-warmup-iters", "1",
         "--distributed-timeout-minutes", "2", "--save-interval", "2"]
EMA_RTOL, EMA_ATOL = 1e-5, 1e-7  # fp32, as the DP EMA test


def run(nproc, d, *args):
    return torchrun(nproc, *FLAGS, "--log-dir", str(d / "log"), "--save", str(d / "ckpt"), *args)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Unsharded, one process: 4 iterations, checkpoints at 2 and 4."""
    d = tmp_path_factory.mktemp("straight")
    run(1, d, "--train-iters", "4")
    return d


@pytest.fixture(scope="module")
def zero3_pp2(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero3_pp2")
    run(4, d, "--train-iters", "4", "--use-torch-fsdp2", "--pipeline-model-parallel-size", "2")
    return d


def assert_same_ema(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=EMA_RTOL, atol=EMA_ATOL, msg=k)


def test_zero3_dp2_pp2_logs_the_unsharded_losses(straight, zero3_pp2):
    assert [p for _, p, _ in losses(straight / "log")] == ["student", "critic", "student", "critic"]
    assert_same_losses(losses(zero3_pp2 / "log"), losses(straight / "log"))
    assert grad_norms(zero3_pp2 / "log") == pytest.approx(grad_norms(straight / "log"), rel=1e-4)
    assert_same_ema(_ema(straight / "ckpt", iteration=4), _ema(zero3_pp2 / "ckpt", iteration=4))


def test_zero3_dp2_pp2_checkpoint_resumes_at_dp2_with_the_straight_ema(straight, zero3_pp2, tmp_path):
    """The DP2 x PP2 iteration-2 checkpoint, loaded by DP2 ZeRO-3 without PP: iterations 3-4 and the
    EMA at iteration 4 equal the uninterrupted unsharded run's."""
    ck = tmp_path / "ckpt"
    shutil.copytree(zero3_pp2 / "ckpt" / "iter_0000002", ck / "iter_0000002")
    (ck / "latest_checkpointed_iteration.txt").write_text("2")
    run(2, tmp_path, "--train-iters", "4", "--use-torch-fsdp2", "--load", str(ck))
    assert_same_losses(losses(tmp_path / "log"), losses(straight / "log")[2:])
    assert_same_ema(_ema(straight / "ckpt", iteration=4), _ema(ck, iteration=4))
