#!/usr/bin/env bash
# GPU session 2026-11-27 (second session), call 6 (nvidia-h100-x2): the round trips again after the review refactor
# (MegatronDP._ensure_state and the offload zero state through sharded_state.ensure_adam_state).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
for X in "" "--optimizer-cpu-offload"; do
  timeout 100 torchrun --standalone --nproc-per-node 2 benchmarks/dist_opt_state_roundtrip.py --out /tmp/rt$X $X > /tmp/rt.log 2>&1
  echo "== DP2 $X exit $?"; grep -E "^  .*_opt|resumed vs" /tmp/rt.log | cut -c1-230 | head -5
done
