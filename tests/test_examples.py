"""examples/: the sbatch scripts parse (bash -n), their configs use only flags pretrain_rcm.py
has with a valid layout, and a dry run with stub srun/scontrol composes the launch line,
resumes with --auto-resume and requeues on SIGUSR1."""

import glob
import os
import signal
import subprocess
import time

import pytest

from rcm_megatron.parallel.config import ParallelConfig
from rcm_megatron.training.arguments import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.sh"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "examples", "**", "*.sbatch"), recursive=True))
CONFIGS = {"wan-1.3b": 1, "wan-14b": 8, "wan-14b-1node": 1}  # config -> minimum nodes


def test_there_are_scripts():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"wan1.3b_1node.sbatch", "wan14b_multinode.sbatch", "common.sh", "wan-1.3b.sh", "wan-14b.sh"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(path):
    p = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def config_args(name):
    cfg = os.path.join(ROOT, "examples", "configs", f"{name}.sh")
    p = subprocess.run(["bash", "-c", f'set -u; source "{cfg}"; printf "%s\\0" "${{TRAIN_ARGS[@]}}"'],
                       capture_output=True, text=True, check=True)
    return p.stdout.split("\0")[:-1]


@pytest.mark.parametrize("name,nodes", sorted(CONFIGS.items()))
def test_config_flags_exist_and_layout_is_valid(name, nodes):
    args = build_parser().parse_args(config_args(name))  # SystemExit on an unknown flag or bad value
    assert args.bf16 and args.data and args.teacher_checkpoint
    par = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                         sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size,
                         cp_comm_type=args.cp_comm_type, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                         micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size)
    for n in (nodes, 2 * nodes):
        par.resolve_batch(8 * n)
    if name.startswith("wan-14b"):
        assert args.model == "wan-14b" and 40 // args.tensor_model_parallel_size % args.context_parallel_size == 0
    if name == "wan-14b-1node":  # the layout tools/plan_memory.py marks best for 8 x 80 GiB at 480p
        from rcm_megatron.models import preset
        from rcm_megatron.planning import Workload, fitting_layouts
        from rcm_megatron.planning.search import workload_and_layout

        w, lay = workload_and_layout(args, preset("wan-14b"), 8)
        assert fitting_layouts(w, 8, 80.0)[0].layout.flags() == lay.flags()


@pytest.fixture
def stubs(tmp_path):
    """srun records its argv and runs nothing (or sleeps); scontrol answers hostnames and records requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_DIR/srun.args"\n'
                                  'sleep "${STUB_SLEEP:-0}"\nexit "${STUB_RC:-0}"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo node-a; echo node-b;\n'
                                      'else echo "$@" >> "$STUB_DIR/scontrol.log"; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_DIR=str(tmp_path), REPO=ROOT,
               RUNS_ROOT=str(tmp_path / "runs"), SLURM_JOB_ID="4242", SLURM_JOB_NAME="rcm-test",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="node-[a-b]", IMAGE="/images/rcm.sqsh", MOUNTS="/lustre:/lustre")
    return tmp_path, env


def test_dry_run_launch_line_and_resume(stubs):
    tmp, env = stubs
    script = os.path.join(ROOT, "examples", "slurm", "wan14b_multinode.sbatch")
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    argv = (tmp / "srun.args").read_text().splitlines()
    ckpt = str(tmp / "runs" / "rcm-test" / "checkpoints")
    assert "--container-image=/images/rcm.sqsh" in argv and f"--container-mounts={ROOT}:{ROOT},/lustre:/lustre" in argv
    assert "--nnodes=2" in argv and "--rdzv-backend=c10d" in argv and "--rdzv-endpoint=node-a:24242" in argv
    assert argv[argv.index("--save") + 1] == ckpt and "--auto-resume" in argv  # fresh start: nothing to resume
    assert argv[argv.index("--tensor-model-parallel-size") + 1] == "2" and "--sequence-parallel" in argv
    assert os.path.isfile(tmp / "runs" / "rcm-test" / "config.sh") and "fresh start" in p.stdout
    # a committed checkpoint exists -> the (requeued) job resumes from it (--auto-resume, said in the log)
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("50")
    p = subprocess.run(["bash", script], env=dict(env, EXTRA_ARGS="--train-iters 7"), capture_output=True, text=True)
    argv = (tmp / "srun.args").read_text().splitlines()
    assert "--auto-resume" in argv and argv[-2:] == ["--train-iters", "7"] and f"resuming from {ckpt}" in p.stdout
    # the training's exit status is the job's
    p = subprocess.run(["bash", script], env=dict(env, STUB_RC="3"), capture_output=True, text=True)
    assert p.returncode == 3 and "exit status 3" in p.stdout


def test_usr1_requeues(stubs):
    tmp, env = stubs
    script = os.path.join(ROOT, "examples", "slurm", "wan1.3b_1node.sbatch")
    proc = subprocess.Popen(["bash", script], env=dict(env, STUB_SLEEP="3", IMAGE=""), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(100):  # wait until srun runs
        if (tmp / "srun.args").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeueing" in out
    argv = (tmp / "srun.args").read_text().splitlines()
    assert not any(a.startswith("--container-image") for a in argv)  # IMAGE empty: on the host


def test_dockerfile():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:" in text and "FROM ${BASE_IMAGE}" in text
    assert 'pip install -e ".[hf,data]"' in text and "\nUSER " in text
    ignore = open(os.path.join(ROOT, ".dockerignore")).read().split()
    assert ".git" in ignore and "runs" in ignore
