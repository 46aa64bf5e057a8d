#!/usr/bin/env bash
# GPU session 2026-11-27, call 3 on nvidia-h100-x4: distributed-optimizer checkpoints (both
# optimizer-state layouts): DP2 resume, DP2 -> DP1 and DP2 -> PP2 x DP2 resharding; CPU-offload memory.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
W=/tmp/w; mkdir -p $W; nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
NGPU=4 SKIP_LAYOUTS=1 SKIP_MEMORY=1 SHARDINGS="fully_reshardable fully_sharded_model_space" OUT=$W/dp \
  timeout 420 bash benchmarks/dp_gpu_check.sh 2>&1 | tee $W/dp.log | grep -v "^\[rank[1-9]\]"
tar czf $OUT/r3.tgz --exclude='ckpt*' --exclude='*tfevents*' -C $W dp dp.log
echo "total $SECONDS"
