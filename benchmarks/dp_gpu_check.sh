#!/usr/bin/env bash
# GPU check of the data-parallel/checkpoint issue (run from the repo root, 2 or 4 GPUs):
# megatron-core DDP + distributed optimizer training with a cosine lr schedule, save, resume
# (same metrics), DP = 2 vs DP = 1, PP = 2 (and PP2 x DP2 on 4 GPUs) with the distributed
# optimizer vs PP = 1, then per-GPU memory of optimizer state and EMA at DP = 1 and 2 (and
# with optimizer CPU offload). Results go to $OUT (default ./dp_results); a summary JSON
# (dp_gpu_check.json) compares every run's losses with the DP = 1 run's.
#   NGPU=4 OUT=... bash benchmarks/dp_gpu_check.sh
set -uo pipefail
OUT=${OUT:-dp_results}; NGPU=${NGPU:-2}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=4 PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$OUT/logs"
run() {  # NAME NPROC FLAGS...: full log in $OUT/logs/NAME.log; on failure the first traceback is shown
  local name=$1 n=$2; shift 2
  torchrun --standalone --nproc-per-node "$n" pretrain_rcm.py "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "[$name] exit $rc"; grep -E "^iter|resumed|saved" "$OUT/logs/$name.log" | tail -2
  [ $rc = 0 ] || grep -m1 -B2 -A45 "Traceback" "$OUT/logs/$name.log" | grep -v "^\s*$" | tail -30
}
mem() {  # NAME NPROC FLAGS...
  local name=$1 n=$2; shift 2
  torchrun --standalone --nproc-per-node "$n" benchmarks/dp_optimizer_memory.py "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "[$name] exit $rc"; grep "^DP=" "$OUT/logs/$name.log"
  [ $rc = 0 ] || grep -m1 -B2 -A45 "Traceback" "$OUT/logs/$name.log" | grep -v "^\s*$" | tail -30
}
COMMON=(--model tiny --bf16 --use-distributed-optimizer --overlap-grad-reduce --log-interval 1
        --micro-batch-size 1 --global-batch-size 4 --student-update-freq 2 --rollout-steps 2
        --lr-decay-style cosine --lr-warmup-iters 1 --lr-decay-iters 6 --min-lr 1e-5)
run dp2_save3 2 "${COMMON[@]}" --train-iters 3 --log-dir "$OUT/dp2_resumed" --save "$OUT/ckpt"
run dp2_resume 2 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/dp2_resumed" --save "$OUT/ckpt" --load "$OUT/ckpt"
run dp1 1 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/dp1"
run dp2 2 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/dp2"
run pp2 2 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/pp2" --pipeline-model-parallel-size 2
if [ "$NGPU" -ge 4 ]; then
  run pp2dp2 4 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/pp2dp2" --pipeline-model-parallel-size 2
  # the DP2 checkpoint (iteration 6) loaded at PP2 x DP2: resharded over stages and DP
  run pp2dp2_from_dp2 4 "${COMMON[@]}" --train-iters 8 --log-dir "$OUT/pp2dp2_from_dp2" \
      --pipeline-model-parallel-size 2 --load "$OUT/ckpt"
  run dp2_from_dp2 2 "${COMMON[@]}" --train-iters 8 --log-dir "$OUT/dp2_from_dp2" --load "$OUT/ckpt"
fi
[ "${SKIP_MEMORY:-0}" = 1 ] || {
  mem mem_dp1 1 --model wan-1.3b --out "$OUT/mem_dp1.json"
  mem mem_dp2 2 --model wan-1.3b --out "$OUT/mem_dp2.json"
}
mem mem_dp2_offload 2 --model wan-1.3b --cpu-offload --out "$OUT/mem_dp2_offload.json"
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def rows(d):
    p = os.path.join(out, d, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
ref = rows("dp1")
summary = {}
for name in ("dp2", "dp2_resumed", "pp2", "pp2dp2", "pp2dp2_from_dp2", "dp2_from_dp2"):
    other = rows(name)
    base = rows("dp2_from_dp2") if name == "pp2dp2_from_dp2" else ref
    if not other:
        summary[name] = "missing"
        continue
    worst, lr_same = 0.0, True
    for a, b in zip(base, other):
        for k in a:
            if k.startswith("loss"):
                worst = max(worst, abs(a[k] - b[k]) / max(abs(a[k]), 1e-12))
        lr_same &= a["lr"] == b["lr"]
    summary[name] = {"iterations": len(other), "compared": min(len(base), len(other)),
                     "max_rel_loss_diff": worst, "same_lr": lr_same}
    print(f"{name:18s} vs {'dp2_from_dp2' if name == 'pp2dp2_from_dp2' else 'dp1':12s}: {summary[name]}")
json.dump(summary, open(os.path.join(out, "dp_gpu_check.json"), "w"), indent=1)
PY
