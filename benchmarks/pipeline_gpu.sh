#!/usr/bin/env bash
# The whole GPU pipeline in one command: examples/pipeline/run_pipeline.py on one H100/H200 (Wan-1.3B,
# 480p x 81 frames, random weights), from the repo root:
#   OUT=dir bash benchmarks/pipeline_gpu.sh [more run_pipeline.py flags, e.g. --iters 8 --videos 4]
# Installs the wheels in .whl/ (diffusers, megatron-core, webdataset, av, tensorboard, ... - whatever the
# image lacks), checks the imports, and copies the results JSON, the whole log and the small samples to $OUT.
#
# Disk: the work folder ($WORK, default /tmp/rcm-pipeline) needs ~55 GB free: the end-of-run training
# checkpoint is 45.4 GB (Wan-1.3B, bf16, distributed optimizer: student 2.8 + fake score 2.8 bf16
# weights, fp32 EMA 5.7, per trained model fp32 main params + two Adam moments 17.0 x 2; the frozen
# teacher is not saved), plus the exported student (2.8 GB), shards, videos and models (~1 GB). It is
# on disk, not /dev/shm: the save itself stages ~80 GB in host RAM (megatron-core gathers the
# distributed optimizer's state to the CPU, 34 GB, its writer copies those views once more, 34 GB,
# plus the weights' and EMA's GPU-to-host copy), so a checkpoint in /dev/shm (RAM too) would exhaust
# a 128 GiB host. The trainer refuses to start (exit 2) when --save has less room than a checkpoint.
# Time on one H100: about 9-12 min at the default --iters 20 (the first iteration compiles, ~90 s;
# the save of 45 GB, ~1-3 min depending on the disk; generate reads the checkpoint four times);
# --iters 8 --videos 4 takes about 8 min. The save's size, time and GB/s per phase are in
# $OUT/pretrain.log ("saved checkpoint at iteration N ...: 45.4 GB in ...").
set -uo pipefail
OUT=${OUT:-pipeline_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -d .whl ] && pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
python3 -c "import av, diffusers, transformers, webdataset, megatron.core, accelerate; \
from torch.utils.tensorboard import SummaryWriter; print('imports ok; av', av.__version__)" || exit 2
W=${WORK:-/tmp/rcm-pipeline}
rm -rf "$W"; mkdir -p "$W"
free=$(df --output=avail -B1G "$W" | tail -1 | tr -d ' ')
df -h "$W" /dev/shm | cat; free -g | cat; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${free:-0}" -lt 55 ]; then
  echo "pipeline_gpu.sh: error: $W has ${free} GB free; the run needs ~55 GB (a 45.4 GB checkpoint + 10% the trainer checks for, the export, the data); set WORK=dir on a disk" >&2
  exit 2
fi
python3 examples/pipeline/run_pipeline.py --work "$W" --results "$OUT/" "$@" 2>&1 | tee "$OUT/pipeline.log"
rc=${PIPESTATUS[0]}
for f in "$W"/samples/student_0.mp4 "$W"/samples/diffusers_0.mp4 "$W"/logs/pretrain.log; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 15000000 ] && cp "$f" "$OUT/"
done
exit "$rc"
