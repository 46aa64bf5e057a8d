#!/usr/bin/env bash
# GPU check of the data-parallel/checkpoint issue on 2 GPUs (run from the repo root):
# megatron-core DDP + distributed optimizer training, save, resume (equal metrics), and
# optimizer-state memory at DP = 1 and 2. Results go to $OUT (or ./dp_results).
set -uo pipefail
OUT=${OUT:-dp_results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=4 PYTHONPATH=$PWD:${PYTHONPATH:-}
run() { torchrun --standalone --nproc-per-node "$1" pretrain_rcm.py "${@:2}"; }
COMMON=(--model tiny --bf16 --use-distributed-optimizer --overlap-grad-reduce --log-interval 1
        --micro-batch-size 1 --global-batch-size 4 --student-update-freq 2 --rollout-steps 2)
set -x
run 2 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/straight" 2>&1 | tail -8
run 2 "${COMMON[@]}" --train-iters 3 --log-dir "$OUT/resumed" --save "$OUT/ckpt" 2>&1 | tail -3
run 2 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/resumed" --save "$OUT/ckpt" --load "$OUT/ckpt" 2>&1 | tail -5
run 1 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/dp1" 2>&1 | tail -3
torchrun --standalone --nproc-per-node 1 benchmarks/dp_optimizer_memory.py --model wan-1.3b --out "$OUT/mem_dp1.json"
torchrun --standalone --nproc-per-node 2 benchmarks/dp_optimizer_memory.py --model wan-1.3b --out "$OUT/mem_dp2.json"
torchrun --standalone --nproc-per-node 2 benchmarks/dp_optimizer_memory.py --model wan-1.3b --cpu-offload --out "$OUT/mem_dp2_offload.json" 2>&1 | tail -3
set +x
python - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
def rows(d):
    return [json.loads(l) for l in open(os.path.join(out, d, "metrics.jsonl"))]
a, b, c = rows("straight"), rows("resumed"), rows("dp1")
for x, y, z in zip(a, b, c):
    la = {k: v for k, v in x.items() if k.startswith("loss_")}
    lb = {k: v for k, v in y.items() if k.startswith("loss_")}
    lc = {k: v for k, v in z.items() if k.startswith("loss_")}
    print(x["iteration"], x["phase"], "straight", la, "resumed", lb, "dp1", lc)
PY
