#!/usr/bin/env bash
# GPU session 2026-11-27 (second session), call 1 (nvidia-h100-x4):
#  1. distributed-optimizer round trip after un-sharing Adam's step (save + resume == straight?)
#  2. distributed-optimizer state resumed at another pipeline size (DP2 -> PP2xDP2, PP2xDP2 -> DP2), through
#     benchmarks/dist_opt_pp_reshard.py (refusal off, stacks dumped on a hang), losses vs straight runs
#  3. optimizer CPU offload memory (Wan-1.3B, DP2), stacks dumped (SIGABRT + PYTHONFAULTHANDLER) if it hangs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 OMP_NUM_THREADS=4
L=/tmp/logs; W=/tmp/work; mkdir -p $L $W
T0=$(date +%s)
guard() {  # SECS NAME CMD...: log in $L/NAME.log; after SECS every python of it dumps stacks (SIGABRT)
  local s=$1 name=$2; shift 2
  setsid "$@" > $L/$name.log 2>&1 & local pid=$!  # own process group: the guard signals all of it
  ( sleep $s; kill -ABRT -- -$pid; sleep 15; kill -9 -- -$pid ) 2>/dev/null & local w=$!
  wait $pid; local rc=$?; kill $w 2>/dev/null
  echo "[$name] exit $rc after $(( $(date +%s) - T0 )) s"; grep -E "^iter|resumed|saved|Error|error:" $L/$name.log | grep -v "^\[rank[1-9]" | tail -3 | cut -c1-300
}
# 1
guard 150 roundtrip torchrun --standalone --nproc-per-node 2 benchmarks/dist_opt_state_roundtrip.py --out $W/rt
grep -E "^rank |^  |resumed vs" $L/roundtrip.log | cut -c1-250 | head -14; cp $W/rt/roundtrip.json $OUT/ 2>/dev/null
# 2
C=(--model tiny --bf16 --use-distributed-optimizer --overlap-grad-reduce --log-interval 1 --micro-batch-size 1
   --global-batch-size 4 --student-update-freq 2 --rollout-steps 2 --lr-decay-style cosine --lr-warmup-iters 1
   --lr-decay-iters 6 --min-lr 1e-5 --distributed-timeout-minutes 2)
P=benchmarks/dist_opt_pp_reshard.py
guard 90 dp2_straight torchrun --standalone --nproc-per-node 2 $P --dump-after 80 "${C[@]}" --train-iters 6 --log-dir $W/dp2_straight
guard 90 dp2_save3 torchrun --standalone --nproc-per-node 2 $P --dump-after 80 "${C[@]}" --train-iters 3 --log-dir $W/dp2_save3 --save $W/ck_dp2
guard 120 pp2dp2_from_dp2 torchrun --standalone --nproc-per-node 4 $P --dump-after 100 "${C[@]}" --pipeline-model-parallel-size 2 --train-iters 6 --log-dir $W/pp2dp2_from_dp2 --load $W/ck_dp2
guard 90 pp2dp2_save3 torchrun --standalone --nproc-per-node 4 $P --dump-after 80 "${C[@]}" --pipeline-model-parallel-size 2 --train-iters 3 --log-dir $W/pp2dp2_save3 --save $W/ck_pp2
guard 120 dp2_from_pp2dp2 torchrun --standalone --nproc-per-node 2 $P --dump-after 100 "${C[@]}" --train-iters 6 --log-dir $W/dp2_from_pp2dp2 --load $W/ck_pp2
python - $W <<'PY' | tee $OUT/pp_reshard_summary.txt
import json, os, sys
w = sys.argv[1]
def rows(d):
    p = os.path.join(w, d, "metrics.jsonl")
    return {r["iteration"]: r for r in map(json.loads, open(p))} if os.path.exists(p) else {}
ref = rows("dp2_straight")
for d in ("dp2_save3", "pp2dp2_from_dp2", "pp2dp2_save3", "dp2_from_pp2dp2"):
    r = rows(d)
    worst = max((abs(r[i][k] - ref[i][k]) / max(abs(ref[i][k]), 1e-12) for i in r if i in ref
                 for k in r[i] if k.startswith("loss")), default=float("nan"))
    gn = max((abs(r[i].get("grad_norm_student", 0) - ref[i].get("grad_norm_student", 0)) for i in r if i in ref), default=float("nan"))
    print(f"{d:18s} iterations {sorted(r)} max rel loss diff vs dp2_straight {worst:.3g}; lr equal "
          f"{all(r[i]['lr'] == ref[i]['lr'] for i in r if i in ref)}")
PY
# 3
guard 240 mem_offload torchrun --standalone --nproc-per-node 2 benchmarks/dp_optimizer_memory.py --model wan-1.3b --cpu-offload --out $OUT/mem_dp2_offload.json
grep -E "^DP=" $L/mem_offload.log
guard 150 mem_dp2 torchrun --standalone --nproc-per-node 2 benchmarks/dp_optimizer_memory.py --model wan-1.3b --out $OUT/mem_dp2.json
grep -E "^DP=" $L/mem_dp2.log
tar czf $OUT/logs.tgz -C /tmp logs; echo "total $(( $(date +%s) - T0 )) s"
