"""Faults around a running trainer (issue 19): Ctrl-C, a killed torchrun launcher, diverged
(non-finite) steps and checkpoint rotation, and first-contact command lines; each with real
processes and real signals."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from test_checkpoint_faults import BASE, ROOT, run_script


def _start(code: str, out, err) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def _wait_for(path_or_file, text: str, proc, timeout=300.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        path_or_file.seek(0)
        if text in path_or_file.read():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout}s")


def _cleanup(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


SLOW_FROM_ITERATION_3 = """
import sys, time
sys.path.insert(0, {root!r})
from rcm_megatron.training.trainer import Trainer
import pretrain_rcm
step = Trainer._one_iteration
def slow(self, it):
    out = step(self, it)
    if it >= 2:
        print("slow iteration", it + 1, flush=True)
        time.sleep({sleep})
    return out
Trainer._one_iteration = slow
sys.exit(pretrain_rcm.main({args!r}))
"""


def _marker(save) -> str | None:
    path = os.path.join(save, "latest_checkpointed_iteration.txt")
    return open(path).read().strip() if os.path.exists(path) else None


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(tmp_path):
    """The first Ctrl-C saves at the end of the iteration and exits 130; the same Ctrl-C
    arriving twice at once (terminal and torchrun's forward) is one interrupt."""
    save = str(tmp_path / "ckpt")
    code = SLOW_FROM_ITERATION_3.format(root=ROOT, sleep=3, args=[*BASE, "--train-iters", "50", "--log-dir",
                                                                   str(tmp_path), "--save", save])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = _start(code, out, err)
        try:
            _wait_for(out, "slow iteration 3", proc)
            assert "settings from --model tiny" in (out.seek(0) or out.read())  # the implied-settings block
            proc.send_signal(signal.SIGINT)
            time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=300)
            err.seek(0)
            stderr = err.read()
        finally:
            _cleanup(proc)
    assert rc == 130, stderr[-3000:]
    assert "interrupt: saving" in stderr and "aborting" not in stderr
    assert _marker(save) == "3"
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["iteration"] == 3


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
    save = str(tmp_path / "ckpt")
    code = SLOW_FROM_ITERATION_3.format(root=ROOT, sleep=60, args=[*BASE, "--train-iters", "50", "--log-dir",
                                                                    str(tmp_path), "--save", save])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = _start(code, out, err)
        try:
            _wait_for(out, "slow iteration 3", proc)
            proc.send_signal(signal.SIGINT)
            time.sleep(1.5)
            t0 = time.time()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=50)  # well inside the 60 s iteration
            took = time.time() - t0
            err.seek(0)
            stderr = err.read()
        finally:
            _cleanup(proc)
    assert rc == 130 and took < 10, (rc, took, stderr[-3000:])
    assert "aborting without saving" in stderr
    assert _marker(save) is None


@pytest.mark.slow
def test_workers_stop_when_the_torchrun_launcher_is_killed(tmp_path):
    psutil = pytest.importorskip("psutil")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "pretrain_rcm.py"), *BASE, "--train-iters", "100000", "--log-dir", str(tmp_path),
           "--save", str(tmp_path / "ckpt"), "--save-interval", "50"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    with tempfile.TemporaryFile("w+") as out:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                                    start_new_session=True)
        workers = []
        try:
            metrics = tmp_path / "metrics.jsonl"
            end = time.time() + 300
            while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
                assert launcher.poll() is None and time.time() < end, (out.seek(0) or out.read())[-3000:]
                time.sleep(0.2)
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                       if "pretrain_rcm.py" in " ".join(p.cmdline())]
            assert len(workers) == 2
            os.kill(launcher.pid, signal.SIGKILL)
            t0 = time.time()

            def alive(p):
                try:
                    return p.status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    return False

            while any(alive(p) for p in workers) and time.time() - t0 < 15:
                time.sleep(0.2)
            still = [p.pid for p in workers if alive(p)]
        finally:
            _cleanup(launcher)
            for p in workers:  # torchrun starts each worker in a session of its own
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
    assert not still, f"workers {still} still running {time.time() - t0:.0f}s after the launcher was killed"


POISONED = """
import sys
sys.path.insert(0, {root!r})
import rcm_megatron.training.trainer as tr

real_critic, real_student = tr.critic_step, tr.student_step

def critic(cfg, student, fake, batch, it, **kw):
    out = real_critic(cfg, student, fake, batch, it, **kw)
    if it >= {first}:
        next(fake.parameters()).grad.fill_(float("nan"))
    return out

def student_step(cfg, teacher, student, fake, batch, it, **kw):
    out = real_student(cfg, teacher, student, fake, batch, it, **kw)
    if it >= {first}:
        next(student.parameters()).grad.fill_(float("nan"))
    return out

tr.critic_step, tr.student_step = critic, student_step
import pretrain_rcm
sys.exit(pretrain_rcm.main({args!r}))
"""


@pytest.mark.slow
def test_diverged_run_aborts_by_default_and_shows_the_non_finite_loss(tmp_path):
    """Every step from iteration 3 on is non-finite: without any flag the run stops after
    10 in a row (exit 1, no save); each such step's progress line says loss=nan and counts it."""
    code = POISONED.format(root=ROOT, first=2, args=[*BASE, "--train-iters", "40", "--log-dir", str(tmp_path),
                                                     "--log-interval", "100", "--save", str(tmp_path / "ckpt")])
    p = run_script(code, check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "10 consecutive steps had non-finite gradients (--max-consecutive-skipped-steps 10)" in p.stderr
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 12 and rows[-1]["skipped_steps"] == 10
    assert rows[2]["loss"] == "nan" and rows[1]["loss"] != "nan"  # metrics.jsonl writes non-finite as strings
    line = [x for x in p.stdout.splitlines() if x.startswith("iter     12")][0]
    assert "loss=nan" in line and "skipped 10 (10 in a row)" in line, line
    assert _marker(str(tmp_path / "ckpt")) is None


@pytest.mark.slow
def test_keep_last_keeps_the_checkpoint_before_the_skipped_steps(tmp_path):
    save = str(tmp_path / "ckpt")
    code = POISONED.format(root=ROOT, first=3, args=[*BASE, "--train-iters", "8", "--log-dir", str(tmp_path),
                                                     "--save", save, "--save-interval", "1", "--keep-last", "2",
                                                     "--max-consecutive-skipped-steps", "0"])
    p = run_script(code, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    kept = sorted(d for d in os.listdir(save) if d.startswith("iter_"))
    assert kept == ["iter_0000003", "iter_0000007", "iter_0000008"], kept
    assert _marker(save) == "8"


# ---------------------------------------------------------------- first contact


def test_flags_are_not_abbreviated_and_negative_values_reach_validation():
    from rcm_megatron.training import arguments as A

    with pytest.raises(SystemExit) as e:
        A.parse_args(["--model", "tiny", "--train-iter", "3"])
    assert e.value.code == 2
    with pytest.raises(A.ArgumentError, match=r"^--lr: expected a finite number > 0, got -0\.001$"):
        A.parse_args(["--model", "tiny", "--lr", "-1e-3"])
    with pytest.raises(A.ArgumentError, match=r"^--lr-fake-score: expected"):
        A.parse_args(["--model", "tiny", "--lr-fake-score", "-2E-4"])
    with pytest.raises(A.ArgumentError, match=r"^--clip-grad must be >= 0"):
        A.parse_args(["--model", "tiny", "--clip-grad", "-1"])
    train, _, rcm, _ = A.parse_args(["--model", "tiny", "--lr-warmup-init", "0", "--seed", "-5"])
    assert train.seed == -5 == rcm.seed


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["convert_checkpoint.py", "evaluate.py", "export_teacher.py", "generate.py",
                                  "prepare_data.py", "synthesize_data.py"])
def test_tools_refuse_abbreviated_flags(tool):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--hel"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    # with abbreviations allowed, --hel is --help: the help and exit 0
    assert p.returncode == 2 and "error:" in p.stderr and not p.stdout, (p.returncode, p.stderr[-2000:])


def test_renamed_flags_keep_their_earlier_spelling():
    from rcm_megatron.training import arguments as A

    new = A.parse_args(["--model", "tiny", "--lr-fake-score", "2e-4", "--tangent-warmup-iters", "3",
                        "--rollout-max-steps", "2", "--ema-sigma-rel", "0.05"])
    old = A.parse_args(["--model", "tiny", "--fake-score-lr", "2e-4", "--tangent-warmup", "3", "--rollout-steps", "2",
                        "--ema-width", "0.05"])
    assert new[2] == old[2] and new[2].tangent_warmup_iters == 3 and new[2].lr_fake_score == 2e-4


def test_ignored_flags_are_errors_and_the_default_teacher_is_the_default_run(tmp_path):
    from rcm_megatron.training import arguments as A

    from rcm_megatron.training.trainer import Trainer

    with pytest.raises(A.ArgumentError, match=r"^--model tiny does not match --teacher-checkpoint .*toy_teacher.pt, "
                                              r"whose architecture has .*'num_layers': 4.* \(--model toy\)"):
        Trainer(*A.parse_args(["--model", "tiny", "--teacher-checkpoint", A.DEFAULT_TEACHER]))
    Trainer(*A.parse_args(["--model", "toy", "--teacher-checkpoint", A.DEFAULT_TEACHER]))  # names it: the 1.3B method
    (tmp_path / "latents.pt").write_bytes(b"")
    with pytest.raises(A.ArgumentError, match=r"^--latent-shape would be ignored: --data .*latents.pt"):
        A.parse_args(["--model", "tiny", "--data", str(tmp_path / "latents.pt"), "--latent-shape", "16", "3", "8", "8"])
    default = A.parse_args([])
    rel = os.path.relpath(A.DEFAULT_TEACHER)
    assert A.parse_args(["--teacher-checkpoint", rel]) == default
    assert default[0].implied["--data"] == "toy" and default[0].implied["--train-iters"] == 300
    assert default[0].implied["--lr"] == 3e-4 and "default run" in default[0].implied_by


@pytest.mark.slow
def test_model_parallel_without_torchrun_says_how_to_launch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_rcm.py"), "--model", "tiny",
                        "--tensor-model-parallel-size", "2", "--log-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "torchrun --nproc-per-node 2 pretrain_rcm.py" in lines[0], lines


@pytest.mark.slow
def test_preset_too_large_for_host_memory_exits_before_allocating(tmp_path):
    """--model wan-14b on a CPU host: one line naming the flag and the estimate, exit 2, in
    seconds (the host's free memory is set to 64 GiB so the test does not depend on the machine)."""
    code = textwrap.dedent(f"""
        import sys, types
        sys.path.insert(0, {ROOT!r})
        import psutil
        psutil.virtual_memory = lambda: types.SimpleNamespace(available=64 * 2**30)
        import pretrain_rcm
        sys.exit(pretrain_rcm.main(["--model", "wan-14b", "--device", "cpu", "--log-dir", {str(tmp_path)!r}]))
    """)
    t0 = time.time()
    p = run_script(code, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("pretrain_rcm.py: error: --model wan-14b: a CPU run needs about")
    assert "64 GiB are available" in lines[0] and time.time() - t0 < 120


def test_memory_estimate_counts_every_model_copy():
    """The CPU pre-flight check uses the memory planner's model states (one estimator)."""
    from rcm_megatron.models import preset
    from rcm_megatron.planning import Layout, Workload
    from rcm_megatron.planning.memory import model_states

    cfg = preset("tiny")
    n = sum(p.numel() for p in __import__("rcm_megatron.models", fromlist=["WanDiT"]).WanDiT(cfg).parameters())

    def training_bytes(distill):
        w = Workload(cfg, (cfg.in_channels, 4, 8, 8), bf16=False, mode="distill" if distill else "teacher")
        gpu, host = model_states(w, Layout(zero=0))
        return sum(gpu.values()) + sum(host.values())

    # fp32: teacher + 2 x (weights + grads) + EMA + 2 x 2 moments = 10 copies
    assert training_bytes(distill=True) == 10 * 4 * n
    assert training_bytes(distill=False) == 5 * 4 * n


def test_cpu_memory_check_plans_the_datas_own_latent_shape(monkeypatch, tmp_path):
    """The default toy run (small latents) passes the CPU memory check on a small host: the planner
    sees the data's latent shape, not the 480p default of the flags."""
    import types

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=4 * 2**30))
    from rcm_megatron.training.arguments import parse_args
    from rcm_megatron.training.preflight import preflight

    train, cfg, rcm, par = parse_args(["--train-iters", "1", "--log-dir", str(tmp_path / "log")])
    checked = preflight(train, cfg, rcm, par)  # raised ArgumentError ("needs about 35 GiB") before the fix
    if checked.lease is not None:
        checked.lease.release()
