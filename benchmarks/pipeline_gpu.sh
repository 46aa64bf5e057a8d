#!/usr/bin/env bash
# examples/pipeline/run_pipeline.py on one H100/H200 (Wan-1.3B, 480p x 81 frames), from the repo root:
#   OUT=dir bash benchmarks/pipeline_gpu.sh [more run_pipeline.py flags, e.g. --iters 12]
# Installs the wheels in .whl/ (diffusers, megatron-core, webdataset, av, tensorboard, ... - whatever the
# image lacks), checks the imports, puts the work folder on /dev/shm when it has room for the ~45 GB
# (one training checkpoint of Wan-1.3B with both optimizers and the EMA is ~40 GB), else /tmp, and
# copies the results JSON, the whole log and the small samples to $OUT.
set -uo pipefail
OUT=${OUT:-pipeline_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -d .whl ] && pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
python3 -c "import av, diffusers, transformers, webdataset, megatron.core, accelerate; \
from torch.utils.tensorboard import SummaryWriter; print('imports ok; av', av.__version__)" || exit 2
shm=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
W=/tmp/rcm-pipeline; [ "${shm:-0}" -gt 60 ] && W=/dev/shm/rcm-pipeline
df -h /tmp /dev/shm | cat; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
rm -rf "$W"
python3 examples/pipeline/run_pipeline.py --work "$W" --results "$OUT/" "$@" 2>&1 | tee "$OUT/pipeline.log"
rc=${PIPESTATUS[0]}
for f in "$W"/samples/student_0.mp4 "$W"/samples/diffusers_0.mp4 "$W"/logs/pretrain.log; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 15000000 ] && cp "$f" "$OUT/"
done
exit "$rc"
