#!/usr/bin/env bash
# GPU session 2026-11-27, call 5 (nvidia-h100-x2): distributed-optimizer round trip after un-sharing Adam's step.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
timeout 110 torchrun --standalone --nproc-per-node 2 benchmarks/dist_opt_state_roundtrip.py --out /tmp/rt > /tmp/rt.log 2>&1
echo "exit $?"; grep "^rank \|resumed vs\|Error" /tmp/rt.log | grep -v "^\[rank1\]" | cut -c1-300 | head; cp /tmp/rt/roundtrip_*.json $OUT/
