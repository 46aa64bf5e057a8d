#!/usr/bin/env bash
# GPU session 2026-11-27, call 2 on nvidia-h100-x4: DP/PP distributed-optimizer checks with full logs
# (resume, PP2 x DP2, CPU offload), then the context-parallel benchmark on 4 GPUs.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
W=/tmp/w; mkdir -p $W/cp; nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
NGPU=4 SKIP_MEMORY=1 OUT=$W/dp timeout 230 bash benchmarks/dp_gpu_check.sh 2>&1 | tee $W/dp.log
echo "dp done $SECONDS"
PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore timeout 330 torchrun --standalone --nproc-per-node 4 benchmarks/cp_dit.py --out $W/cp --deadline 230 > $W/cp.log 2>&1
echo "cp done $SECONDS"; grep "^\[" $W/cp.log | cut -c1-200 | tail -20; grep -m1 -A30 Traceback $W/cp.log
tar czf $OUT/r2.tgz --exclude=ckpt --exclude='*tfevents*' -C $W dp cp dp.log cp.log
echo "total $SECONDS"
