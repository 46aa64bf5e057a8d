#!/usr/bin/env bash
# GPU session 2026-11-27 (second session), call 4 (nvidia-h100-x4), after call 3: the time embedding gets its own
# grad-buffer bucket at PP > 1 (stages had stepped it with different gradients), CPU-offload checkpoints load
# (optimizer classes in the common state), and the trainer no longer refuses a PP change of distributed-optimizer state:
#  1. round trip at PP2xDP2 and at DP2 with CPU offload (state before save == after load; resumed == straight)
#  2. pretrain_rcm.py: DP2 -> PP2xDP2 and PP2xDP2 -> DP2 resumes vs a straight DP2 run
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 OMP_NUM_THREADS=4
L=/tmp/logs; W=/tmp/work; mkdir -p $L $W
T0=$(date +%s)
guard() {  # SECS NAME CMD...: log in $L/NAME.log; after SECS all of it dumps stacks (SIGABRT) and dies
  local s=$1 name=$2; shift 2
  setsid "$@" > $L/$name.log 2>&1 & local pid=$!
  ( sleep $s; kill -ABRT -- -$pid; sleep 10; kill -9 -- -$pid ) 2>/dev/null & local w=$!
  wait $pid; local rc=$?; kill $w 2>/dev/null
  echo "[$name] exit $rc after $(( $(date +%s) - T0 )) s"; grep -E "^iter|saved" $L/$name.log | tail -1 | cut -c1-200
  [ $rc = 0 ] || grep -B3 -A25 "failed:$\|^\[rank0\]: Traceback" $L/$name.log | grep -v "^\s*\^*$" | tail -12 | cut -c1-250
  tar czf $OUT/logs.tgz -C /tmp logs
}
R=benchmarks/dist_opt_state_roundtrip.py
guard 90 rt_pp2dp2 torchrun --standalone --nproc-per-node 4 $R --out $W/rt_pp2dp2 --pipeline-model-parallel-size 2
grep -E "^rank |^  .*_opt|resumed vs" $L/rt_pp2dp2.log | cut -c1-260 | head -12; cp $W/rt_pp2dp2/roundtrip.json $OUT/roundtrip_pp2dp2.json
guard 110 rt_offload torchrun --standalone --nproc-per-node 2 $R --out $W/rt_offload --optimizer-cpu-offload
grep -E "^rank |^  .*_opt|resumed vs" $L/rt_offload.log | cut -c1-260 | head -8; cp $W/rt_offload/roundtrip.json $OUT/roundtrip_dp2_offload.json
C=(--model tiny --bf16 --use-distributed-optimizer --overlap-grad-reduce --log-interval 1 --micro-batch-size 1
   --global-batch-size 4 --student-update-freq 2 --rollout-steps 2 --lr-decay-style cosine --lr-warmup-iters 1
   --lr-decay-iters 6 --min-lr 1e-5 --distributed-timeout-minutes 2)
P=pretrain_rcm.py
guard 60 dp2_save3 torchrun --standalone --nproc-per-node 2 $P "${C[@]}" --train-iters 3 --log-dir $W/dp2_save3 --save $W/ck_dp2
guard 70 pp2dp2_from_dp2 torchrun --standalone --nproc-per-node 4 $P "${C[@]}" --pipeline-model-parallel-size 2 --train-iters 6 --log-dir $W/pp2dp2_from_dp2 --load $W/ck_dp2
guard 60 dp2_from_pp2dp2 torchrun --standalone --nproc-per-node 2 $P "${C[@]}" --train-iters 6 --log-dir $W/dp2_from_pp2dp2 --load $W/rt_pp2dp2/ckpt
guard 60 dp2_straight torchrun --standalone --nproc-per-node 2 $P "${C[@]}" --train-iters 6 --log-dir $W/dp2_straight
python - $W <<'PY' | tee $OUT/call4_summary.txt
import json, os, sys
w = sys.argv[1]
def rows(d):
    p = os.path.join(w, d, "metrics.jsonl")
    return {r["iteration"]: r for r in map(json.loads, open(p))} if os.path.exists(p) else {}
def cmp(d, base):
    r, ref = rows(d), rows(base)
    worst = max((abs(r[i][k] - ref[i][k]) / max(abs(ref[i][k]), 1e-12) for i in r if i in ref
                 for k in r[i] if k.startswith("loss")), default=float("nan"))
    gn = max((abs(r[i]["grad_norm"] - ref[i]["grad_norm"]) / ref[i]["grad_norm"] for i in r if i in ref
              and "grad_norm" in r[i]), default=float("nan"))
    print(f"{d:28s} vs {base:20s} iterations {sorted(r)} max rel loss diff {worst:.3g}, grad norm {gn:.3g}; "
          f"lr equal {all(r[i]['lr'] == ref[i]['lr'] for i in r if i in ref)}")
for d in ("pp2dp2_from_dp2", "dp2_from_pp2dp2", "rt_pp2dp2/straight", "rt_offload/straight"):
    cmp(d, "dp2_straight")
cmp("rt_pp2dp2/second", "rt_pp2dp2/straight")
cmp("rt_offload/second", "rt_offload/straight")
PY
echo "total $(( $(date +%s) - T0 )) s"
