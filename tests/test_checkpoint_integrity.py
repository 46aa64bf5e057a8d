"""Checkpoint integrity and run safety with real trainer processes (tiny model): checksums
verified on load (and --auto-resume's fallback), atomic re-save under SIGKILL, a missing marker,
a fresh run into a used --save, --keep-last never removing the marker's checkpoint (nor the last
one before skipped steps: test_checkpoint_faults), one writer per --save (a lease), metrics.jsonl's torn last line,
unwritable and full output directories, and a missing --iteration in the converter."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from test_checkpoint_faults import BASE, ROOT, losses, pretrain, run_script, tree_digest
from test_convert_checkpoint import load_tool

pytestmark = pytest.mark.slow
MARKER = "latest_checkpointed_iteration.txt"


def iters(ck):
    return sorted(d for d in os.listdir(ck) if d.startswith("iter_"))


@pytest.fixture
def saved(tiny_checkpoints):
    """Checkpoints at iterations 2 and 4 (marker 4) and the run's metrics (conftest.py: one run
    shared with test_checkpoint_faults; read-only, tests change copies)."""
    return tiny_checkpoints


def copy(saved, tmp_path):
    shutil.copytree(saved / "ck", tmp_path / "ck")
    shutil.copytree(saved / "log", tmp_path / "log")
    return tmp_path / "ck"


def flip(path, offset, n=64):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_flipped_bytes_are_refused_and_auto_resume_falls_back(saved, tmp_path):
    ck = copy(saved, tmp_path)
    shard = ck / "iter_0000004" / "__0_0.distcp"
    flip(shard, os.path.getsize(shard) // 2)  # inside a weight tensor: loads without a word unless checked
    p = pretrain(*BASE, "--train-iters", "6", "--log-dir", str(tmp_path / "l"), "--load", str(ck), check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()[-1]
    assert "__0_0.distcp: checksum mismatch" in err and "iter_0000004" in err, p.stderr[-3000:]
    cc = load_tool("convert_checkpoint")
    assert cc.main(["verify", str(ck)]) == 2
    assert cc.main(["export", "--load", str(ck), "--out", str(tmp_path / "out")]) == 2
    # --auto-resume falls back to iteration 2, says so, trains on and commits a good iteration 4.
    p = pretrain(*BASE, "--train-iters", "4", "--log-dir", str(tmp_path / "log"), "--save", str(ck), "--auto-resume")
    assert "resuming from the newest checkpoint that verifies" in p.stderr and "iter_0000002" in p.stderr
    assert f"resumed from {ck / 'iter_0000002'} at iteration 2" in p.stdout
    assert cc.main(["verify", str(ck)]) == 0
    assert losses(tmp_path / "log") == losses(saved / "log")


def test_truncated_shard_garbage_metadata_and_missing_iteration(saved, tmp_path, capsys):
    ck = copy(saved, tmp_path)
    shard = ck / "iter_0000004" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    p = pretrain(*BASE, "--train-iters", "6", "--log-dir", str(tmp_path / "l"), "--load", str(ck), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "__0_0.distcp" in p.stderr and "truncated" in p.stderr and "iter_0000004" in p.stderr
    meta = ck / "iter_0000002" / ".metadata"
    meta.write_bytes(os.urandom(os.path.getsize(meta)))
    cc = load_tool("convert_checkpoint")
    capsys.readouterr()
    assert cc.main(["verify", str(ck)]) == 2
    err = capsys.readouterr().err
    assert "iter_0000004/__0_0.distcp" in err and "iter_0000002/.metadata: checksum mismatch" in err
    assert cc.main(["export", "--load", str(ck), "--iteration", "2", "--out", str(tmp_path / "o")]) == 2
    assert ".metadata: checksum mismatch" in capsys.readouterr().err
    assert cc.main(["export", "--load", str(saved / "ck"), "--iteration", "123", "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint of iteration 123; present: 2, 4" in capsys.readouterr().err
    # a folder committed before checksums existed: refused, until its checksums are recorded
    legacy = tmp_path / "legacy"
    shutil.copytree(saved / "ck", legacy)
    os.remove(legacy / "iter_0000002" / "checksums.json")
    assert cc.main(["verify", str(legacy)]) == 2
    assert "iter_0000002/checksums.json: missing" in capsys.readouterr().err
    assert cc.main(["verify", "--record", str(legacy)]) == 0


KILL_AT_COMMIT_STEP = """
import os, shutil, signal, sys
sys.path.insert(0, {root!r})
from rcm_megatron.checkpointing import save
count = [0]
def counted(fn):
    def wrapper(*a, **k):
        if armed[0]:
            count[0] += 1
            if count[0] == {k}:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapper
armed = [False]
real_commit = save.CheckpointManager.commit
def commit(self, iteration):
    armed[0] = True
    return real_commit(self, iteration)
save.CheckpointManager.commit = commit
os.replace, os.rename, shutil.rmtree = counted(os.replace), counted(os.rename), counted(shutil.rmtree)
import pretrain_rcm
if __name__ == "__main__":
    sys.exit(pretrain_rcm.main(sys.argv[1:]))
"""


def test_resave_is_atomic_under_sigkill(saved, tmp_path):
    """Resuming at iteration 4 with --train-iters 4 re-saves iteration 4; a SIGKILL at every
    file-system step of its commit leaves a complete, verifying iter_0000004 that resumes."""
    files = {"common.pt", "metadata.json", ".metadata", "__0_0.distcp"}
    killed = []
    for k in range(1, 10):
        ck = tmp_path / f"ck{k}"
        shutil.copytree(saved / "ck", ck)
        script = tmp_path / "kill.py"
        script.write_text(KILL_AT_COMMIT_STEP.format(root=ROOT, k=k))
        p = run_script(None, check=False, argv=[script, *BASE, "--train-iters", "4", "--log-dir", tmp_path / "l",
                                                "--save", ck, "--load", ck])
        assert (ck / "iter_0000004").is_dir() and files <= set(os.listdir(ck / "iter_0000004")), (k, os.listdir(ck))
        if p.returncode == 0:
            break
        assert p.returncode == -9, p.stderr[-3000:]
        killed.append(ck)
    assert len(killed) > 2  # the commit has several steps, each was hit
    cc = load_tool("convert_checkpoint")
    for c in killed:
        assert cc.main(["verify", str(c / "iter_0000004")]) == 0, c
    pretrain(*BASE, "--train-iters", "5", "--log-dir", str(tmp_path / "l"), "--save", str(ck), "--auto-resume")


def test_missing_marker_resumes_from_the_newest_complete(saved, tmp_path):
    ck = copy(saved, tmp_path)
    os.remove(ck / MARKER)
    p = pretrain(*BASE, "--train-iters", "5", "--log-dir", str(tmp_path / "log"), "--save", str(ck), "--auto-resume")
    assert f"resumed from {ck / 'iter_0000004'} at iteration 4" in p.stdout
    assert "is missing; resuming from the newest complete checkpoint" in p.stderr
    assert (ck / MARKER).read_text() == "5"
    # the marker naming a folder that is gone, and the newest folder incomplete: the next complete one
    from rcm_megatron.checkpointing.resume import resolve_resume

    (ck / MARKER).write_text("8")
    os.remove(ck / "iter_0000005" / "common.pt")
    assert resolve_resume(None, str(ck), auto_resume=True) == str(ck / "iter_0000004")


def test_fresh_run_into_used_save_is_refused_and_keep_last_keeps_the_marker(saved, tmp_path):
    ck = copy(saved, tmp_path)
    before = tree_digest(ck)
    p = pretrain(*BASE, "--train-iters", "2", "--log-dir", str(tmp_path / "l"), "--save", str(ck), check=False)
    assert p.returncode == 2
    assert f"--save {ck} already holds checkpoints (newest: {ck / 'iter_0000004'})" in p.stderr
    assert "--load" in p.stderr and "another --save" in p.stderr and "iter " not in p.stdout
    assert tree_digest(ck) == before
    # --load elsewhere, --save here: the new iteration 3 is the marker's and survives --keep-last 1
    other = tmp_path / "other"
    shutil.copytree(saved / "ck", other)
    (other / MARKER).write_text("2")
    pretrain(*BASE, "--train-iters", "3", "--log-dir", str(tmp_path / "l2"), "--load", str(other), "--save", str(ck),
             "--keep-last", "1")
    assert (ck / MARKER).read_text() == "3" and iters(ck) == ["iter_0000003", "iter_0000004"]


def _start_trainer(ck, log, env, *extra):
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import pretrain_rcm; "
            f"sys.exit(pretrain_rcm.main({[*BASE, '--log-dir', str(log), '--save', str(ck), *extra]!r}))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **env),
                            start_new_session=True)


def test_one_writer_per_save(tmp_path):
    ck, env = tmp_path / "ck", {"RCM_LEASE_HEARTBEAT_S": "1"}
    a = _start_trainer(ck, tmp_path / "la", env, "--train-iters", "100000", "--save-interval", "1", "--keep-last", "2")
    try:
        for _ in range(600):
            if (ck / MARKER).exists():
                break
            assert a.poll() is None, a.stderr.read()[-3000:]
            time.sleep(0.1)
        p = pretrain(*BASE, "--train-iters", "3", "--log-dir", str(tmp_path / "lb"), "--save", str(ck), "--auto-resume",
                     check=False, env=env)
        assert p.returncode == 2, p.stderr[-3000:]
        assert "is being written by another trainer" in p.stderr and f"pid {a.pid}" in p.stderr
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    # the holder was SIGKILLed: its lease is taken over, with a warning, and the run resumes
    p = pretrain(*BASE, "--train-iters", "100000", "--exit-duration-in-mins", "1e-4", "--log-dir", str(tmp_path / "lc"),
                 "--save", str(ck), "--auto-resume", env=env)
    # (its process is gone, or its heartbeat is stale by now: either reason)
    assert f"taking over the lease {ck / 'writer.lease'} (" in p.stderr and f"pid {a.pid}" in p.stderr
    assert "resumed from" in p.stdout and not (ck / "writer.lease").exists()


def test_lease_takeover_rules(tmp_path, monkeypatch):
    """A lease of another host: refused while its heartbeat is fresh, taken when stale; a lease of
    this SLURM job before its requeue is taken, one of the same job and restart refused."""
    from rcm_megatron.checkpointing.errors import CheckpointError
    from rcm_megatron.checkpointing.lease import LEASE, WriterLease

    def plant(**rec):
        base = {"host": "other-node", "pid": 1, "start_time": time.time() - 100, "heartbeat": time.time(),
                "interval": 30, "token": "x", "slurm_job_id": None, "slurm_restart_count": "0"}
        (tmp_path / LEASE).write_text(json.dumps({**base, **rec}))

    plant()
    with pytest.raises(CheckpointError, match="host other-node, pid 1"):
        WriterLease(str(tmp_path)).acquire()
    plant(heartbeat=time.time() - 1000)
    WriterLease(str(tmp_path)).acquire().release()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    plant(slurm_job_id="77", slurm_restart_count="0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(CheckpointError, match="SLURM job 77"):
        WriterLease(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lease = WriterLease(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LEASE).read_text())["slurm_restart_count"] == "1"
    lease.release()
    assert not (tmp_path / LEASE).exists()


def test_torn_metrics_line_is_dropped_on_resume(saved, tmp_path):
    ck = copy(saved, tmp_path)
    with open(tmp_path / "log" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "loss_crit')  # a crash (or a full disk) in the middle of a line
    p = pretrain(*BASE, "--train-iters", "5", "--log-dir", str(tmp_path / "log"), "--load", str(ck), "--save", str(ck))
    assert "metrics.jsonl: dropping its torn last line" in p.stderr
    rows = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]


def test_unwritable_output_dirs_fail_before_building(tmp_path):
    (tmp_path / "file").write_text("x")
    for flag in ("--save", "--log-dir"):
        args = {"--save": str(tmp_path / "s"), "--log-dir": str(tmp_path / "l")}
        args[flag] = str(tmp_path / "file" / "sub")  # a path under a regular file (root ignores permissions)
        p = pretrain(*BASE, "--train-iters", "2", *[x for kv in args.items() for x in kv], check=False)
        assert p.returncode == 2 and f"{flag} {tmp_path / 'file' / 'sub'}: not writable" in p.stderr, p.stderr[-2000:]
        assert "iter " not in p.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A 26 MB tmpfs: room for one tiny-model checkpoint (17 MB) but not two."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=26m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", str(d)])


def test_full_disk_during_save_keeps_the_previous_checkpoint(small_disk, tmp_path):
    ck = small_disk / "ck"
    p = pretrain(*BASE, "--train-iters", "4", "--save-interval", "2", "--log-dir", str(tmp_path / "l"),
                 "--save", str(ck), check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()[-1]
    assert f"saving iteration 4 to {ck / 'iter_0000004.tmp'} failed (No space left on device" in err, p.stderr[-3000:]
    assert f"the last complete checkpoint ({ck / 'iter_0000002'}) is kept" in err
    assert iters(ck) == ["iter_0000002"] and (ck / MARKER).read_text() == "2"
    assert load_tool("convert_checkpoint").main(["verify", str(ck)]) == 0


def test_too_little_space_for_one_checkpoint(small_disk, tmp_path):
    with tempfile.NamedTemporaryFile(dir=small_disk) as f:
        f.write(b"\0" * (16 << 20))  # 10 MB left
        f.flush()
        p = pretrain(*BASE, "--train-iters", "2", "--log-dir", str(tmp_path / "l"), "--save", str(small_disk / "ck"),
                     check=False)
    assert p.returncode == 2 and "GB free, one checkpoint of this run needs about 0.018 GB" in p.stderr, p.stderr[-2000:]
