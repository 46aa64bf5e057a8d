"""pretrain_rcm.py under torchrun (gloo, CPU): every layout logs the single-process losses,
checkpoints reshard across layouts, and resumes are exact."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # pretrain_rcm.py under torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--model", "tiny", "--log-interval", "1", "--student-update-freq", "2", "--rollout-max-steps", "2",
          "--micro-batch-size", "1", "--global-batch-size", "2"]
LOSS_RTOL = 1e-4  # fp32: TP/SP/DP reorder reductions; the losses agree to ~1e-6 relative in practice


def torchrun(nproc, *args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, "pretrain_rcm.py"), *COMMON, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def losses(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["iteration"], r["phase"], {k: v for k, v in r.items() if k.startswith("loss")}) for r in rows]


def grad_norms(log_dir):
    """The logged gradient norm of every iteration."""
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["grad_norm"] for line in f]


def assert_same_losses(a, b):
    assert [(i, p) for i, p, _ in a] == [(i, p) for i, p, _ in b]
    for (_, _, la), (_, _, lb) in zip(a, b):
        assert la.keys() == lb.keys()
        for k in la:
            assert la[k] == pytest.approx(lb[k], rel=LOSS_RTOL), (k, la[k], lb[k])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The single-process run every layout is compared with: 8 iterations (the first 6 are those of a
    6-iteration run: the default lr is constant), checkpoints at 3, 6 and 8."""
    d = tmp_path_factory.mktemp("tp1")
    torchrun(1, "--train-iters", "8", "--log-dir", str(d / "log"), "--save", str(d / "ckpt"), "--save-interval", "3")
    return d


def first6(log_dir):
    return losses(log_dir)[:6]


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    """One DP = 2 run (6 iterations, checkpoints at 3 and 6) for the loss and the EMA tests."""
    d = tmp_path_factory.mktemp("dp2")
    torchrun(2, "--train-iters", "6", "--log-dir", str(d / "log"), "--save", str(d / "ckpt"), "--save-interval", "3")
    return d


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
])
def test_tensor_parallel_logs_the_same_losses(baseline, tmp_path, layout):
    torchrun(2, "--train-iters", "6", "--log-dir", str(tmp_path), *layout)
    assert_same_losses(first6(baseline / "log"), losses(tmp_path))


def test_data_parallel_logs_the_same_losses(baseline, dp2):
    assert_same_losses(first6(baseline / "log"), losses(dp2 / "log"))


def test_reshard_tp1_checkpoint_to_tp2_and_back(baseline, tmp_path):
    """Load the TP=1 iteration-3 checkpoint at TP=2 (+SP), save at 6, load that at TP=1."""
    import shutil

    ck = tmp_path / "ckpt"
    shutil.copytree(baseline / "ckpt" / "iter_0000003", ck / "iter_0000003")
    (ck / "latest_checkpointed_iteration.txt").write_text("3")
    log = tmp_path / "log"
    shutil.copytree(baseline / "log", log)
    torchrun(2, "--train-iters", "6", "--log-dir", str(log), "--load", str(ck), "--save", str(ck),
             "--tensor-model-parallel-size", "2", "--sequence-parallel")
    assert_same_losses(first6(baseline / "log"), losses(log))
    torchrun(1, "--train-iters", "8", "--log-dir", str(tmp_path / "log8"), "--load", str(ck))
    assert_same_losses(losses(baseline / "log")[6:], losses(tmp_path / "log8"))  # the straight 8 iterations


def test_auto_resume_and_sigterm(tmp_path):
    """SIGTERM (SLURM pre-emption) saves and exits 0; --auto-resume continues from it."""
    import signal
    import time

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    save, log = tmp_path / "ckpt", tmp_path / "log"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_rcm.py"), *COMMON, "--train-iters", "100000",
           "--log-dir", str(log), "--save", str(save), "--auto-resume"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (log / "metrics.jsonl").exists() and len((log / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "exiting at iteration" in out and "SIGTERM" in out
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert stopped >= 3 and stopped == len(losses(log))
    p2 = subprocess.run([c if c != "100000" else str(stopped + 2) for c in cmd], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert f"resumed from {save}" in p2.stdout
    assert [i for i, _, _ in losses(log)] == list(range(1, stopped + 3))


def _ema(ck_root, iteration=None):
    """The EMA weights of a training checkpoint, read by the converter (any layout, one process)."""
    from rcm_megatron.checkpointing.loading import open_source, read_full_state_dict

    return read_full_state_dict(open_source(str(ck_root), weights="ema", iteration=iteration))


def test_ema_is_sharded_over_data_parallel_and_reshards(baseline, dp2, tmp_path):
    """At DP = 2 each rank keeps half the EMA (by size); the checkpoint holds the whole of it,
    equal to the DP = 1 run's, and it resumes at DP = 1."""
    import shutil

    import torch

    from rcm_megatron.models import WanDiT, preset
    from rcm_megatron.rcm.ema import partition_names

    ck = dp2 / "ckpt"
    a, b = _ema(baseline / "ckpt", iteration=6), _ema(ck)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    sizes = {n: p.numel() for n, p in WanDiT(preset("tiny")).named_parameters()}
    parts = partition_names(sizes, 2)
    assert sorted(parts[0] + parts[1]) == sorted(sizes) and not set(parts[0]) & set(parts[1])
    load = [sum(sizes[n] for n in p) for p in parts]
    assert max(load) / min(load) < 1.1, load  # balanced halves
    # the DP = 2 iteration-3 checkpoint resumes at DP = 1 and goes on like the straight DP = 1 run
    resume = tmp_path / "resume"
    shutil.copytree(ck / "iter_0000003", resume / "iter_0000003")
    (resume / "latest_checkpointed_iteration.txt").write_text("3")
    torchrun(1, "--train-iters", "6", "--log-dir", str(tmp_path / "log6"), "--load", str(resume))
    assert_same_losses(first6(baseline / "log")[3:], losses(tmp_path / "log6"))


def _bytes_written_by_rank(ckpt_dir):
    """Bytes of the torch_dist data files of each rank (``__<rank>_<i>.distcp``)."""
    out = {}
    for name in os.listdir(ckpt_dir):
        if name.startswith("__") and name.endswith(".distcp"):
            r = int(name[2:].split("_")[0])
            out[r] = out.get(r, 0) + os.path.getsize(os.path.join(ckpt_dir, name))
    return out


def test_fully_parallel_save_spreads_the_replicated_writes(dp2):
    """--ckpt-fully-parallel-save (the default): the DP-replicated model and optimizer tensors are
    written by both DP ranks, not all by DP rank 0 (which leaves rank 1 its EMA shard only)."""
    written = _bytes_written_by_rank(dp2 / "ckpt" / "iter_0000006")
    total = sum(written.values())
    assert set(written) == {0, 1} and total > 0
    assert min(written.values()) > 0.3 * total, written  # the replicated tensors are most of the bytes
