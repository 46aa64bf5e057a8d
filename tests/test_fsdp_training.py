"""pretrain_rcm.py --use-torch-fsdp2 (ZeRO-3 over DP x CP, FSDP2) under torchrun on gloo CPU ranks:
every layout logs the losses of the unsharded single-process run, and a ZeRO-3 checkpoint
resumes at another layout (and without ZeRO-3) exactly where the unsharded run goes on.
The flag conflicts end with one line and exit 2 before anything is built."""

import pytest

from test_parallel_training import assert_same_losses, grad_norms, losses, torchrun

ITERS = ["--train-iters", "4", "--distributed-timeout-minutes", "2"]


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("unsharded")
    torchrun(1, *ITERS, "--log-dir", str(d / "log"))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    [],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--context-parallel-size", "2", "--cp-comm-type", "a2a"],
], ids=["dp2", "dp2xtp2", "dp2xcp2"])
def test_zero3_logs_the_unsharded_losses(unsharded, tmp_path, layout):
    nproc = 2 * (2 if layout else 1)
    torchrun(nproc, *ITERS, "--log-dir", str(tmp_path), "--use-torch-fsdp2", *layout)
    assert_same_losses(losses(tmp_path), losses(unsharded / "log"))
    assert grad_norms(tmp_path) == pytest.approx(grad_norms(unsharded / "log"), rel=1e-4)


@pytest.mark.slow
def test_zero3_checkpoint_resumes_at_another_layout(unsharded, tmp_path):
    """Saved at DP2 x TP2 under ZeRO-3 at iteration 2; resumed on one rank (ZeRO-3 over a group of
    one) and on DP2 without ZeRO-3: iterations 3-4 equal the straight unsharded run's."""
    ck = tmp_path / "ck"
    torchrun(4, "--train-iters", "2", "--distributed-timeout-minutes", "2", "--log-dir", str(tmp_path / "a"),
             "--use-torch-fsdp2", "--tensor-model-parallel-size", "2", "--save", str(ck))
    straight = losses(unsharded / "log")[2:]
    torchrun(1, *ITERS, "--log-dir", str(tmp_path / "b"), "--load", str(ck), "--use-torch-fsdp2")
    assert_same_losses(losses(tmp_path / "b"), straight)
    torchrun(2, *ITERS, "--log-dir", str(tmp_path / "c"), "--load", str(ck))
    assert_same_losses(losses(tmp_path / "c"), straight)


@pytest.mark.parametrize("flags, words", [
    (["--use-torch-fsdp2", "--use-distributed-optimizer"], "exclude each other"),
    (["--use-torch-fsdp2", "--overlap-grad-reduce"], "FSDP2 overlaps"),
    (["--use-torch-fsdp2", "--fp8-teacher"], "--fp8-teacher"),
    (["--optimizer-cpu-offload"], "need --use-distributed-optimizer"),
])
def test_backend_flag_conflicts_exit_2_with_one_line(flags, words, capsys):
    import pretrain_rcm

    assert pretrain_rcm.main(["--model", "tiny", "--device", "cpu", *flags]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("pretrain_rcm.py: error: --") and words in lines[0], lines
