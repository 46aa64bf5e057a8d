"""Faults around checkpoints: a process killed (SIGKILL) in the middle of writing one, a
partial or foreign checkpoint, and steps whose gradients are not finite."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # training subprocesses killed, failed and resumed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--model", "tiny", "--log-interval", "1", "--micro-batch-size", "1", "--global-batch-size", "2",
        "--rollout-max-steps", "2", "--student-update-freq", "2"]


def run_script(code: str | None, check=True, env=None, timeout=600, argv=()):
    """Run ``code`` (or, when None, the script and arguments ``argv``) in its own session with
    output in files: a process killed by SIGKILL leaves megatron-core's writer helper process
    behind, which must not hold our pipes open."""
    import signal
    import tempfile
    import types

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        cmd = [sys.executable, "-c", code] if code is not None else [sys.executable, *map(str, argv)]
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the session
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        p = types.SimpleNamespace(returncode=proc.returncode, stdout=out.read(), stderr=err.read())
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def pretrain(*args, check=True, env=None):
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import pretrain_rcm; sys.exit(pretrain_rcm.main({list(args)!r}))"
    return run_script(code, check=check, env=env)


def tree_digest(path) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            h.update(os.path.join(root, f).encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def losses(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k.startswith("loss") or k == "iteration"} for line in f]


def resume_from(checkpoints, dst, iteration: int):
    """A --save / --load folder holding only ``checkpoints``' iteration ``iteration`` (the marker names it)."""
    shutil.copytree(os.path.join(checkpoints, f"iter_{iteration:07d}"), os.path.join(dst, f"iter_{iteration:07d}"))
    with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return dst


def test_sigkill_during_save_keeps_the_previous_checkpoint(tiny_checkpoints, tmp_path):
    """The first run (saved iteration 2, logged 1-2) is the shared tiny run's; its 4 iterations are
    the straight run the resume must equal."""
    ck, log = resume_from(tiny_checkpoints / "ck", str(tmp_path / "ckpt"), 2), str(tmp_path / "log")
    os.makedirs(log)
    with open(tiny_checkpoints / "log" / "metrics.jsonl") as src, open(os.path.join(log, "metrics.jsonl"), "w") as dst:
        dst.writelines(src.readlines()[:2])
    # Second run dies by SIGKILL inside megatron-core's shard writer while saving iteration 4.
    killer = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        FileSystemWriterAsync.write_preloaded_data = staticmethod(die)
        import pretrain_rcm
        sys.exit(pretrain_rcm.main({[*BASE, "--train-iters", "4", "--log-dir", log, "--save", ck, "--load", ck]!r}))
    """)
    p = run_script(killer, check=False)
    assert p.returncode == -9
    assert os.path.isdir(os.path.join(ck, "iter_0000004.tmp"))
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read() == "2"
    # The surviving checkpoint loads, and the resumed run equals a straight one.
    pretrain(*BASE, "--train-iters", "4", "--log-dir", log, "--save", ck, "--load", ck)
    assert losses(log) == losses(tiny_checkpoints / "log")
    assert not os.path.exists(os.path.join(ck, "iter_0000004.tmp"))


def test_partial_checkpoint_is_refused_and_untouched(tiny_checkpoints, tmp_path):
    ck = resume_from(tiny_checkpoints / "ck", tmp_path / "ckpt", 2)
    os.remove(ck / "iter_0000002" / "metadata.json")
    before = tree_digest(ck)
    p = pretrain(*BASE, "--train-iters", "4", "--log-dir", str(tmp_path / "l"), "--load", str(ck), "--save", str(ck),
                 check=False)
    assert p.returncode == 2
    assert "iter_0000002: missing metadata.json" in p.stderr
    assert tree_digest(ck) == before


def test_checkpoint_of_another_architecture_or_method(tiny_checkpoints, tmp_path):
    saved = tiny_checkpoints / "ck"
    before = tree_digest(saved)
    p = pretrain("--model", "wan-1.3b", "--latent-shape", "16", "1", "4", "4", "--train-iters", "3",
                 "--log-dir", str(tmp_path / "a"), "--load", str(saved), check=False)
    assert p.returncode == 2 and "another architecture" in p.stderr and "hidden_size" in p.stderr
    p = pretrain(*BASE, "--method", "dmd", "--train-iters", "3", "--log-dir", str(tmp_path / "b"),
                 "--load", str(saved), check=False)
    assert p.returncode == 2 and "--method rcm" in p.stderr and "--method dmd" in p.stderr
    p = pretrain("--model", "tiny", "--train-iters", "5", "--log-dir", str(tmp_path / "c"), "--load", str(saved),
                 "--method", "scm", check=False)  # (was test_pretrain.test_resume_rejects_other_method)
    assert p.returncode == 2 and "--method rcm" in p.stderr
    assert tree_digest(saved) == before


def poisoned_critic_run(args: list) -> str:
    """A training run (``run_script`` code) whose critic gradients are NaN from iteration 4 on."""
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import rcm_megatron.training.trainer as tr
        real = tr.critic_step
        def poisoned(cfg, student, fake, batch, it, **kw):
            out = real(cfg, student, fake, batch, it, **kw)
            if it >= 3:
                next(fake.parameters()).grad.fill_(float("nan"))
            return out
        tr.critic_step = poisoned
        import pretrain_rcm
        if __name__ == "__main__":
            sys.exit(pretrain_rcm.main({list(args)!r}))
    """)


def test_non_finite_gradients_are_skipped_then_abort(tmp_path):
    """Poisoned critic gradients (from iteration 4 on): the step is skipped and counted; after N in a
    row the run aborts without saving the aborting iteration. With --save-interval 1 --keep-last 1,
    the checkpoint of iteration 5 (a finite student step) is the last before the run of skips 6, 7, 8
    and survives --keep-last 1 (was also test_checkpoint_integrity's keep-last test: one run for both)."""
    ck = tmp_path / "ckpt"
    code = poisoned_critic_run([*BASE, "--student-update-freq", "5", "--train-iters", "20",
                                "--max-consecutive-skipped-steps", "3", "--log-dir", str(tmp_path),
                                "--save", str(ck), "--save-interval", "1", "--keep-last", "1"])
    p = run_script(code, check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "3 consecutive steps had non-finite gradients" in p.stderr
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # iteration 5 is a (finite) student step, which resets the consecutive count
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 1, 1, 2, 3, 4]
    # nothing saved at the abort (iteration 8): the marker stays at the last interval save
    assert sorted(x for x in os.listdir(ck) if x.startswith("iter_")) == ["iter_0000005", "iter_0000007"]
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "7"


FAILING_RANK = """
import sys
sys.path.insert(0, {root!r})
import time
import torch.distributed as dist
from rcm_megatron.parallel import initialize
from rcm_megatron.training.trainer import Trainer
import pretrain_rcm

step = Trainer._one_iteration

def failing(self, it):
    if it == 4 and dist.get_rank() == 1:  # iterations 1-4 are done
        raise RuntimeError("injected failure on rank 1 in iteration 5")
    return step(self, it)

def blocking_teardown():  # as NCCL's teardown blocks while peers wait inside a collective
    time.sleep(3600)

if __name__ == "__main__":  # the checkpoint writer's spawned helper re-imports this file
    Trainer._one_iteration = failing
    initialize.destroy_distributed = blocking_teardown
    sys.exit(pretrain_rcm.main(sys.argv[1:]))
"""


def test_a_failing_rank_reports_and_the_job_exits(tmp_path):
    """One rank raises mid-run while the others wait in a collective: its traceback is printed
    and the job ends at once, without the process-group teardown, which under NCCL blocks while
    peers sit in a collective (simulated here: gloo's would return), and the last checkpoint stays."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(root=ROOT))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), *BASE,
           "--train-iters", "6", "--save", str(tmp_path / "ck"), "--save-interval", "2", "--log-dir",
           str(tmp_path / "log"), "--distributed-timeout-minutes", "5"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the job hung after the failure:\n{(e.stderr or b'')[-3000:]}") from None
    assert p.returncode != 0
    assert "RuntimeError: injected failure on rank 1 in iteration 5" in p.stderr, p.stderr[-4000:]
    assert open(tmp_path / "ck" / "latest_checkpointed_iteration.txt").read().strip() == "4"
