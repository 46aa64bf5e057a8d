"""pretrain_rcm.py with --pipeline-model-parallel-size under torchrun (gloo, CPU): PP = 2,
PP = 2 x DP = 2 and PP = 2 x CP = 2 log the single-process losses for the same seed, data and
global batch (4 micro-batches of gradient accumulation at DP = 1), and checkpoints reshard
PP2 -> PP1 and PP1 -> PP2 (each stage saves its own blocks under global names, the time
embedding once)."""

import shutil

import pytest

from test_parallel_training import assert_same_losses, grad_norms, losses, torchrun
from test_pretrain import run

# After test_parallel_training's common flags (the last occurrence of a flag wins): 4 blocks,
# 4 micro-batches per DP rank at DP = 1, clipping by the global gradient norm active.
PP_FLAGS = ["--model", "tiny-4l", "--global-batch-size", "4", "--clip-grad", "1e4"]


def pretrain(nproc, *args):
    return torchrun(nproc, *PP_FLAGS, *args)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp1")
    pretrain(1, "--train-iters", "4", "--log-dir", str(d / "log"), "--save", str(d / "ckpt"), "--save-interval", "2")
    return d


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp2")
    p = pretrain(2, "--pipeline-model-parallel-size", "2", "--train-iters", "4", "--log-dir", str(d / "log"),
                 "--save", str(d / "ckpt"), "--save-interval", "2")
    return d, p


@pytest.mark.slow
def test_pp2_logs_the_single_process_losses(baseline, pp2):
    d, p = pp2
    assert_same_losses(losses(baseline / "log"), losses(d / "log"))
    assert grad_norms(d / "log") == pytest.approx(grad_norms(baseline / "log"), rel=1e-5)
    assert "common state dict differs" not in p.stdout + p.stderr  # every rank saves the same common state


@pytest.mark.slow
def test_pp2_times_dp2_logs_the_single_process_losses(baseline, tmp_path):
    pretrain(4, "--pipeline-model-parallel-size", "2", "--train-iters", "4", "--log-dir", str(tmp_path))
    assert_same_losses(losses(baseline / "log"), losses(tmp_path))
    assert grad_norms(tmp_path) == pytest.approx(grad_norms(baseline / "log"), rel=1e-5)


@pytest.mark.slow
def test_pp2_times_cp2_logs_the_single_process_losses(tmp_path):
    """Latents of 3 x 3 x 5 = 45 tokens: the stages exchange zero-padded CP chunks of 23 tokens.
    Equal gradient norms check the DP x CP reduction on every stage (test_context_parallel_training);
    the iteration-3 checkpoint then continues at PP 1 like the straight run."""
    latents = ["--latent-shape", "16", "3", "6", "10"]
    pretrain(1, *latents, "--train-iters", "4", "--log-dir", str(tmp_path / "pp1"))
    pretrain(4, *latents, "--train-iters", "3", "--pipeline-model-parallel-size", "2", "--context-parallel-size", "2",
             "--cp-comm-type", "p2p", "--log-dir", str(tmp_path / "pp2cp2"), "--save", str(tmp_path / "ckpt"))
    assert_same_losses(losses(tmp_path / "pp1")[:3], losses(tmp_path / "pp2cp2"))
    assert grad_norms(tmp_path / "pp2cp2") == pytest.approx(grad_norms(tmp_path / "pp1")[:3], rel=1e-4)
    pretrain(1, *latents, "--train-iters", "4", "--log-dir", str(tmp_path / "resumed"),
             "--load", str(tmp_path / "ckpt"))
    assert_same_losses(losses(tmp_path / "pp1")[3:], losses(tmp_path / "resumed"))


def _resume_from(src_ckpt, dst, iteration):
    ck = dst / "ckpt"
    shutil.copytree(src_ckpt / f"iter_{iteration:07d}", ck / f"iter_{iteration:07d}")
    (ck / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return ck


@pytest.mark.slow
def test_reshard_pp2_checkpoint_to_pp1(baseline, pp2, tmp_path):
    """The PP = 2 iteration-2 checkpoint loads at PP = 1 and continues like the straight run."""
    ck = _resume_from(pp2[0] / "ckpt", tmp_path, 2)
    pretrain(1, "--train-iters", "4", "--log-dir", str(tmp_path / "log"), "--load", str(ck))
    assert_same_losses(losses(baseline / "log")[2:], losses(tmp_path / "log"))


@pytest.mark.slow
def test_reshard_pp1_checkpoint_to_pp2(baseline, tmp_path):
    ck = _resume_from(baseline / "ckpt", tmp_path, 2)
    pretrain(2, "--pipeline-model-parallel-size", "2", "--train-iters", "4", "--log-dir", str(tmp_path / "log"),
             "--load", str(ck))
    assert_same_losses(losses(baseline / "log")[2:], losses(tmp_path / "log"))


@pytest.mark.parametrize("args,message", [
    (["--model", "tiny", "--pipeline-model-parallel-size", "4"],
     "--pipeline-model-parallel-size 4 must divide the number of transformer blocks (2)"),
])
def test_bad_pipeline_layouts_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun would set; checked before any process group exists
    p = run(*PP_FLAGS, *args, "--train-iters", "1", "--micro-batch-size", "1", "--global-batch-size", "1",
            "--log-dir", str(tmp_path), check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
