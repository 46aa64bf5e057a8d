#!/usr/bin/env bash
# Toy-task distillations on GPUs (docs/quality.md), one run per GPU at a time, each evaluated
# (tools/evaluate.py, on the host CPU, teacher metrics reused from the committed benchmark).
# Usage, from the repo root:
#   OUT=dir bash benchmarks/toy_quality_gpu.sh "GPU NAME METHOD ITERS FLAGS..." ["GPU NAME ..."] ...
# Runs sharing a GPU go one after the other; different GPUs in parallel. Each run writes
# OUT/NAME/{metrics.jsonl, eval.json, eval_paper.json, train.log}; checkpoints stay in
# OUT/NAME/checkpoints and the EMA as a model file OUT/NAME/ema.pt (SKIP_EVAL=1: evaluate elsewhere). DEVICE=cpu EVAL_ARGS='--num-samples 64 --num-reference 256' checks the script.
set -uo pipefail
OUT=${OUT:-toy_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=2 PYTHONPATH=$PWD:${PYTHONPATH:-}
TEACHER_JSON=${TEACHER_JSON:-benchmarks/results/toy_quality.json}
TEACHER_JSON_PAPER=${TEACHER_JSON_PAPER:-benchmarks/results/toy_quality_paper_times.json}

one() {  # GPU NAME METHOD ITERS FLAGS...
  local gpu=$1 name=$2 method=$3 iters=$4; shift 4
  local d="$OUT/$name"; mkdir -p "$d"
  local t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$gpu python pretrain_rcm.py --method "$method" --train-iters "$iters" --device "${DEVICE:-cuda}" \
      --log-dir "$d" --save "$d/checkpoints" --save-interval "$iters" --log-interval 100 "$@" > "$d/train.log" 2>&1
  echo "$name: trained in $((SECONDS - t0)) s (exit $?); $(tail -1 "$d/metrics.jsonl" | cut -c1-60)"
  python tools/export_teacher.py "$d/checkpoints" "$d/ema.pt" > "$d/export.log" 2>&1 || tail -3 "$d/export.log"
  [ "${SKIP_EVAL:-0}" = 1 ] && return
  python tools/evaluate.py --student "$name=$d/checkpoints" --skip-untrained --teacher-from "$TEACHER_JSON" \
      --no-plot ${EVAL_ARGS:-} --out "$d/eval" > "$d/eval.log" 2>&1
  python tools/evaluate.py --student "$name=$d/checkpoints" --skip-untrained --teacher-from "$TEACHER_JSON_PAPER" \
      --mid-times 1.3 1.0 0.6 --no-plot ${EVAL_ARGS:-} --out "$d/eval_paper" > "$d/eval_paper.log" 2>&1
  echo "$name: done in $((SECONDS - t0)) s"; grep -A12 "^| model" "$d/eval.log" | grep "$name" || tail -3 "$d/eval.log"
}

declare -A queue
for spec in "$@"; do
  gpu=${spec%% *}
  queue[$gpu]+="${spec}"$'\n'
done
for gpu in "${!queue[@]}"; do
  (
    while IFS= read -r spec; do
      [ -n "$spec" ] || continue
      # shellcheck disable=SC2086
      one $spec
    done <<< "${queue[$gpu]}"
  ) &
done
wait
