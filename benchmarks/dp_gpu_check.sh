#!/usr/bin/env bash
# GPU check of the data-parallel/checkpoint issue (run from the repo root, 2 or 4 GPUs):
# megatron-core DDP + distributed optimizer training with a cosine lr schedule, save, resume
# (same metrics), DP = 2 vs DP = 1, PP = 2 (and PP2 x DP2 on 4 GPUs) with the distributed
# optimizer vs PP = 1, then per-GPU memory of optimizer state and EMA at DP = 1 and 2 (and
# with optimizer CPU offload). Results go to $OUT (default ./dp_results); a summary JSON
# (dp_gpu_check.json) compares every run's losses with the DP = 1 run's (layouts) or the straight
# DP = 2 run's (resume, reshard).
#   NGPU=4 OUT=... [SKIP_LAYOUTS=1]
#   [SKIP_MEMORY=1] bash benchmarks/dp_gpu_check.sh
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
        --micro-batch-size 1 --global-batch-size 4 --student-update-freq 2 --rollout-max-steps 2
        --lr-decay-style cosine --lr-warmup-iters 1 --lr-decay-iters 6 --min-lr 1e-5)
if [ "${SKIP_LAYOUTS:-0}" != 1 ]; then  # the same losses at every layout
  run dp1 1 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/dp1"
  run dp2 2 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/dp2"
  run pp2 2 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/pp2" --pipeline-model-parallel-size 2
  [ "$NGPU" -ge 4 ] && run pp2dp2 4 "${COMMON[@]}" --train-iters 6 --log-dir "$OUT/pp2dp2" --pipeline-model-parallel-size 2
fi
# checkpoints, per optimizer-state layout: DP2 save at 3, resume to 6 (== straight), then the
# iteration-6 checkpoint loaded at DP1, run to 8 (== DP2 straight to 8). Pipeline resharding of this
# state and CPU offload: benchmarks/dist_opt_state_roundtrip.py and the 20261127b session scripts (git show 502da45:benchmarks/sessions/).
run dp2_straight8 2 "${COMMON[@]}" --train-iters 8 --log-dir "$OUT/dp2_straight8"
for S in fully_reshardable; do  # megatron-core's optimizer-state layout used by the trainer
  C=()
  run "${S}_dp2_save3" 2 "${COMMON[@]}" "${C[@]}" --train-iters 3 --log-dir "$OUT/${S}_dp2_resumed" --save "$OUT/ckpt_$S"
  run "${S}_dp2_resume" 2 "${COMMON[@]}" "${C[@]}" --train-iters 6 --log-dir "$OUT/${S}_dp2_resumed" \
      --save "$OUT/ckpt_$S" --load "$OUT/ckpt_$S"
  run "${S}_dp1_from_dp2" 1 "${COMMON[@]}" "${C[@]}" --train-iters 8 --log-dir "$OUT/${S}_dp1_from_dp2" \
      --load "$OUT/ckpt_$S"
done
[ "${SKIP_MEMORY:-0}" = 1 ] || {
  mem mem_dp1 1 --model wan-1.3b --out "$OUT/mem_dp1.json"
  mem mem_dp2 2 --model wan-1.3b --out "$OUT/mem_dp2.json"
}
mem mem_dp2_offload 2 --model wan-1.3b --cpu-offload --out "$OUT/mem_dp2_offload.json"
python - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def rows(d):
    p = os.path.join(out, d, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
def compare(name, base):
    other, ref = rows(name), rows(base)
    if not other:
        return "missing"
    ref = {r["iteration"]: r for r in ref}
    worst, lr_same, n = 0.0, True, 0
    for b in other:
        a = ref.get(b["iteration"])
        if a is None:
            continue
        n += 1
        for k in a:
            if k.startswith("loss"):
                worst = max(worst, abs(a[k] - b[k]) / max(abs(a[k]), 1e-12))
        lr_same &= a["lr"] == b["lr"]
    return {"vs": base, "iterations": [r["iteration"] for r in other], "compared": n,
            "max_rel_loss_diff": worst, "same_lr": lr_same}
summary = {}
for name in ("dp2", "pp2", "pp2dp2"):
    summary[name] = compare(name, "dp1")
for d in sorted(glob.glob(os.path.join(out, "*_dp2_resumed"))):
    summary[os.path.basename(d)] = compare(os.path.basename(d), "dp2_straight8")
for d in sorted(glob.glob(os.path.join(out, "*_from_dp2"))):
    summary[os.path.basename(d)] = compare(os.path.basename(d), "dp2_straight8")
for k, v in summary.items():
    print(f"{k:45s} {v}")
json.dump(summary, open(os.path.join(out, "dp_gpu_check.json"), "w"), indent=1)
PY
