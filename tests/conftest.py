"""Test-wide settings: float64 oracles need deterministic CPU math; Triton kernels run
under the interpreter when no GPU is present (must be set before triton is imported); the
repository's sources byte-compiled once; one tiny training run with checkpoints that the
checkpoint fault tests share (each run costs a process start)."""

import compileall
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Every process the tests start (training subprocesses, torchrun workers, tools) computes on tiny
# tensors with one OpenMP thread: with two, OpenMP's spin-waiting took 2-3x the CPU of one thread
# for the same run (tiny model, 8 iterations: 13-18 s of CPU against 6 s, measured on 2 cores
# shared with other work), and multi-rank tests already run several processes on the 2 cores.
# Set after torch's own import, so this process keeps the threads set above.
os.environ["OMP_NUM_THREADS"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite starts a few hundred Python processes (training subprocesses, torchrun workers, tools).
# Where PYTHONDONTWRITEBYTECODE is set (CI containers often set it) none of them writes the
# package's bytecode, so each one compiled the ~17k lines it imports again (~0.8 s of CPU a
# process); compiling them once here lets every process read the cached bytecode.
for _d in ("rcm_megatron", "tools", "tests", "benchmarks", "examples"):
    compileall.compile_dir(os.path.join(ROOT, _d), quiet=1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """One tiny training run that the checkpoint fault tests share (read-only; tests copy what they
    change): 4 iterations of test_checkpoint_faults.BASE, checkpoints at 2 and 4 (marker 4) under
    ``ck``, its metrics (the straight run they compare resumes with) under ``log``."""
    from test_checkpoint_faults import BASE, pretrain

    d = tmp_path_factory.mktemp("saved")
    pretrain(*BASE, "--train-iters", "4", "--save-interval", "2", "--log-dir", str(d / "log"), "--save", str(d / "ck"))
    assert sorted(x for x in os.listdir(d / "ck") if x.startswith("iter_")) == ["iter_0000002", "iter_0000004"]
    return d


@pytest.fixture(autouse=True)
def _restore_process_wide_kernel_modes():
    """Tests that build models in-process (``build_models``) set the process-wide fused-ops mode; under
    pytest-xdist the next test on the same worker would inherit it. Restore it after every test."""
    from rcm_megatron.kernels import fused_ops

    saved = list(fused_ops._mode)
    yield
    fused_ops._mode[:] = saved
