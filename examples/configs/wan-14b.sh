# Wan2.1 T2V 14B -> 4-step student with rCM, 480p, 81 frames (32760 tokens), 8 or more 8-GPU nodes.
# Layout per model replica: tensor parallel 2 with sequence parallelism x context parallel 4
# (Ulysses all-to-all: 40 heads / TP 2 = 20 heads per rank, divisible by CP 4) = 8 GPUs,
# so data parallel = number of nodes. Sourced by examples/slurm/wan14b_multinode.sbatch.
# On ONE node of 8 x 80 GiB use examples/configs/wan-14b-1node.sh (the planned ZeRO-3 layout).
#   TEACHER  diffusers WanTransformer3DModel folder (Wan2.1-T2V-14B-Diffusers/transformer)
#   DATA     shard directory from tools/prepare_data.py or tools/synthesize_data.py
: "${TEACHER:=/checkpoints/Wan2.1-T2V-14B-Diffusers/transformer}"
: "${DATA:=/data/wan-480p-81f/shards}"
NPROC_PER_NODE=8

TRAIN_ARGS=(
  --teacher-checkpoint "$TEACHER"
  --model wan-14b   # selects the 14B method preset; the architecture comes from the checkpoint
  --data "$DATA"
  --bf16
  --method rcm
  --tensor-model-parallel-size 2
  --sequence-parallel
  --context-parallel-size 4
  --cp-comm-type a2a
  --pipeline-model-parallel-size 1
  # 64 samples per iteration: DP = nodes (8, 16, 32 or 64 divide it), micro-batches of 1
  --micro-batch-size 1
  --global-batch-size 64
  --train-iters 5000
  # the paper's Wan 14B recipe
  --lr 1e-6
  --lr-fake-score 1e-7
  --student-update-freq 10
  --p-g "lognormal(1.5,1.6)"
  --p-d "uniform_shift(5)"
  --cfg-scale 5
  --rollout-max-steps 4
  --ema-sigma-rel 0.1
  --save-interval 25
  --keep-last 2
  --log-interval 5
)
