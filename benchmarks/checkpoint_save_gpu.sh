#!/usr/bin/env bash
# The real training checkpoint save at Wan-1.3B size on one GPU, alone: pretrain_rcm.py with the shipped
# config's model path (bf16, distributed optimizer, recompute) for one iteration on tiny synthetic latents,
# then its end-of-run save (45.4 GB). From the repo root:
#   OUT=dir bash benchmarks/checkpoint_save_gpu.sh            # one H100/H200: ~3-5 min, ~55 GB free disk in $WORK
#   OUT=dir TINY=1 bash benchmarks/checkpoint_save_gpu.sh     # CPU, the tiny model (checks the script, seconds)
# Writes $OUT/checkpoint_save.log: the trainer's "saved checkpoint ...: X GB in Y s (Z GB/s; build, plan+stage,
# write (background), commit)" line, and /usr/bin/time's peak host RSS of the run (the save's host staging),
# plus the checkpoint's files and sizes. RCM_CKPT_WRITE_THREADS sets the writer processes (default 4 here).
set -uo pipefail
OUT=${OUT:-checkpoint_save_out}; mkdir -p "$OUT"
W=${WORK:-/tmp/rcm-ckpt-save}; rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -d .whl ] && pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
if [ -n "${TINY:-}" ]; then
  FLAGS=(--model tiny --device cpu --latent-shape 16 2 4 4)
else
  FLAGS=(--model wan-1.3b --bf16 --use-distributed-optimizer --recompute-granularity full --recompute-num-layers 1
         --latent-shape 16 1 8 8)
  df -h "$W" | cat; free -g | cat; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
TIME=(); [ -x /usr/bin/time ] && TIME=(/usr/bin/time -v)
"${TIME[@]}" python3 pretrain_rcm.py "${FLAGS[@]}" --train-iters 1 --micro-batch-size 1 --global-batch-size 1 \
  --rollout-max-steps 2 --save "$W/ck" --log-dir "$W/log" 2>&1 | tee "$OUT/checkpoint_save.log"
rc=${PIPESTATUS[0]}
ls -l "$W"/ck/iter_*/ 2>&1 | tee -a "$OUT/checkpoint_save.log"
du -sh "$W/ck" 2>&1 | tee -a "$OUT/checkpoint_save.log"
grep -E "saved checkpoint|Maximum resident" "$OUT/checkpoint_save.log"
rm -rf "$W"
exit "$rc"
