#!/usr/bin/env bash
# GPU session 2026-11-27, call 4: distributed-optimizer state round trip through a checkpoint, per layout.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
for S in fully_reshardable fully_sharded_model_space; do
  timeout 100 torchrun --standalone --nproc-per-node 2 benchmarks/dist_opt_state_roundtrip.py --out /tmp/rt --sharding $S > /tmp/rt_$S.log 2>&1
  echo "== $S exit $?"; grep -A5 "^rank \|Error" /tmp/rt_$S.log | grep -v "^\[rank1\]" | cut -c1-400 | head -24
  cp /tmp/rt/roundtrip_$S.json $OUT/ 2>/dev/null
done
