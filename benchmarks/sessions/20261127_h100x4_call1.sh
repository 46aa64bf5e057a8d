#!/usr/bin/env bash
# GPU session 2026-11-27, call 1 on nvidia-h100-x4 (device tool; $OUT comes back): DP/checkpoint check and PP bubble on GPUs 0-1, toy rCM schedule sweep on GPUs 2-3.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
W=/tmp/w; mkdir -p $W; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
Q="--lr 3e-4 --fake-score-lr 3e-4 --exit-duration-in-mins 3.3"
SKIP_EVAL=1 OUT=$W/q bash benchmarks/toy_quality_gpu.sh "2 A rcm 1200 --micro-batch-size 32 --lr-decay-style cosine --min-lr 3e-6 $Q" "3 B rcm 1200 --micro-batch-size 16 --lr-decay-style cosine --min-lr 3e-6 $Q" "2 D rcm 1200 --micro-batch-size 32 --lr 1e-4 --fake-score-lr 1e-4 --exit-duration-in-mins 3.3" "3 C rcm 1200 --micro-batch-size 64 --lr-decay-style cosine --min-lr 3e-6 $Q" > $W/quality.log 2>&1 & QP=$!
CUDA_VISIBLE_DEVICES=0,1 NGPU=2 OUT=$W/dp timeout 300 bash benchmarks/dp_gpu_check.sh > $W/dp.log 2>&1
echo "dp done $SECONDS"
CUDA_VISIBLE_DEVICES=0,1 timeout 170 torchrun --standalone --nproc-per-node 2 benchmarks/pp_bubble.py --out $W/pp > $W/pp.log 2>&1
echo "pp done $SECONDS"
for i in $(seq 100); do kill -0 $QP 2>/dev/null || break; [ $SECONDS -gt 545 ] && { pkill -f pretrain_rcm; pkill -f export_teacher; break; }; sleep 3; done
cat $W/quality.log
for r in A B C D; do tar czf $OUT/q_$r.tgz -C $W/q $r --exclude=checkpoints 2>/dev/null; done
tar czf $OUT/dp_pp.tgz -C $W --exclude=ckpt --exclude='*tfevents*' dp pp dp.log pp.log quality.log
tail -25 $W/dp.log; tail -22 $W/pp.log; echo "total $SECONDS"
