# Shared by the sbatch scripts in this folder (sourced, not run): run folders, container
# flags, NCCL settings, torchrun rendezvous, auto-resume and requeue on the time-limit signal.
#
# Knobs (environment; the sbatch scripts and configs set defaults):
#   REPO          checkout to run from (default: the directory sbatch was called in)
#   RUN_NAME      run folder name under RUNS_ROOT (default: the job name)
#   RUNS_ROOT     where run folders go (default: $REPO/runs); a run folder holds
#                 checkpoints/ (--save, --load), tensorboard/ (--log-dir) and a copy of the config
#   IMAGE         pyxis/enroot image: a .sqsh file or a docker URI such as
#                 nvcr.io#nvidia/pytorch:25.04-py3 or registry#team/rcm-megatron:latest;
#                 empty: run on the host (a venv with the project installed)
#   MOUNTS        --container-mounts (comma list SRC:DST), e.g. /lustre:/lustre; REPO is always mounted
#   MAX_RESTARTS  requeue at most this many times (default 20)
#   EXTRA_ARGS    more pretrain_rcm.py flags, appended last (e.g. "--train-iters 200")

: "${REPO:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${RUN_NAME:=${SLURM_JOB_NAME:-rcm}}"
: "${RUNS_ROOT:=$REPO/runs}"
: "${MAX_RESTARTS:=20}"
RUN_DIR="$RUNS_ROOT/$RUN_NAME"
CKPT_DIR="$RUN_DIR/checkpoints"
TB_DIR="$RUN_DIR/tensorboard"

rcm_log() { echo "[$(date '+%F %T')] [job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

rcm_nccl_env() {
  # Megatron orders TP/SP communication behind compute on one CUDA stream connection.
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # NVLink SHARP (multicast) off: it reserves memory per communicator and some fabrics lack it.
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
  export PYTHONUNBUFFERED=1
  # Site specific (InfiniBand HCAs, socket interface): set them in your environment, e.g.
  #   export NCCL_IB_HCA=mlx5_0,mlx5_1,...  NCCL_SOCKET_IFNAME=ib0  NCCL_IB_GID_INDEX=3
}

rcm_rendezvous() {
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  export MASTER_ADDR MASTER_PORT
}

# Always --auto-resume: the first start finds no checkpoint and starts fresh; a requeued job resumes
# from the newest checkpoint of --save that verifies, even when the marker file is missing or its
# checkpoint is damaged (a fresh start into a --save that holds checkpoints would be refused).
rcm_resume_args() {
  echo "--auto-resume"
}

rcm_container_args() {
  CONTAINER_ARGS=()
  if [ -n "${IMAGE:-}" ]; then
    local mounts="$REPO:$REPO"
    [ -n "${MOUNTS:-}" ] && mounts="$mounts,$MOUNTS"
    CONTAINER_ARGS=(--container-image="$IMAGE" --container-mounts="$mounts" --container-workdir="$REPO"
                    --no-container-mount-home)
  fi
}

# SIGUSR1 arrives --signal's lead time before the time limit (#SBATCH --signal=B:USR1@300):
# requeue the job; it restarts with --auto-resume from the newest checkpoint that verifies.
REQUEUED=0
rcm_on_usr1() {
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_RESTARTS" ]; then
    rcm_log "SIGUSR1: time limit near; not requeueing (restart count ${SLURM_RESTART_COUNT:-0} >= MAX_RESTARTS=$MAX_RESTARTS)"
    return
  fi
  rcm_log "SIGUSR1: time limit near; requeueing, the next start resumes from $CKPT_DIR"
  REQUEUED=1
  scontrol requeue "$SLURM_JOB_ID"
}

# rcm_launch NPROC_PER_NODE ARGS... : srun one torchrun per node, wait for it (a trapped signal
# interrupts `wait`, so wait again until the step is gone) and return its exit status.
rcm_launch() {
  local nproc=$1
  shift
  mkdir -p "$CKPT_DIR" "$TB_DIR"
  rcm_nccl_env
  rcm_rendezvous
  rcm_container_args
  local resume
  resume=$(rcm_resume_args)
  # shellcheck disable=SC2206
  local extra=(${EXTRA_ARGS:-})
  local state="fresh start"
  [ -f "$CKPT_DIR/latest_checkpointed_iteration.txt" ] && state="resuming from $CKPT_DIR"
  rcm_log "nodes ${SLURM_NNODES:-1} x $nproc GPUs | master $MASTER_ADDR:$MASTER_PORT | run $RUN_DIR | $state"
  trap rcm_on_usr1 USR1
  # shellcheck disable=SC2086
  srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" \
    torchrun --nnodes="${SLURM_NNODES:-1}" --nproc-per-node="$nproc" \
      --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID:-0}" \
      --max-restarts=0 \
      "$REPO/pretrain_rcm.py" "$@" --save "$CKPT_DIR" --log-dir "$TB_DIR" $resume "${extra[@]}" &
  local pid=$! rc=0
  while true; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1
  if [ "$REQUEUED" = 1 ]; then
    rcm_log "training step ended (exit $rc) for the requeue"
    return 0
  fi
  rcm_log "training finished with exit status $rc"
  return "$rc"
}
