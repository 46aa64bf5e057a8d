#!/usr/bin/env bash
# GPU session 2026-11-27 (second session), call 5: the CPU-offload round trip after the hybrid optimizer's fp32 load fix.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 OMP_NUM_THREADS=4
timeout -s ABRT 150 torchrun --standalone --nproc-per-node 2 benchmarks/dist_opt_state_roundtrip.py --out /tmp/rt --optimizer-cpu-offload > $OUT/rt_offload.log 2>&1
echo "exit $?"; grep -E "^rank |^  .*_opt|resumed vs" $OUT/rt_offload.log | cut -c1-260 | head -8
grep "^\[rank0\]" $OUT/rt_offload.log | grep -v "\^\^" | tail -8 | cut -c1-250; cp /tmp/rt/roundtrip.json $OUT/roundtrip_dp2_offload.json
