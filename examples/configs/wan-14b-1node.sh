# Wan2.1 T2V 14B -> 4-step student with rCM, 480p, 81 frames (32760 tokens), ONE node of 8 x 80 GiB.
# The layout tools/plan_memory.py marks best for 8 x 80 GiB at 480p:
#   tools/plan_memory.py --model wan-14b --gpus 8 --gpu-memory-gib 80 --latent-shape 16 21 60 104
# ZeRO-3 (--use-torch-fsdp2: teacher, student and fake score sharded over the 8 data-parallel
# ranks), optimizer CPU offload (fp32 shards, gradients and AdamW state on the host: about 54 GiB
# of host RAM per GPU, 430 GiB per node) and full activation recompute; planned peak 62 GiB per
# GPU in the student step (23% headroom), 48 GiB in the critic step. Sourced by
# examples/slurm/wan14b_1node.sbatch.
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
  --tensor-model-parallel-size 1
  --context-parallel-size 1
  --pipeline-model-parallel-size 1
  --use-torch-fsdp2
  --optimizer-cpu-offload
  --recompute-granularity full
  --recompute-num-layers 1
  # 64 samples per iteration: DP 8, 8 micro-batches of 1 per rank
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
