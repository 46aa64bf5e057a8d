# Wan2.1 T2V 1.3B -> 4-step student with rCM, 480p, 81 frames (latents 16x21x60x104 = 32760 tokens).
# One 8-GPU node: data parallel 8, no model parallelism. Sourced by examples/slurm/wan1.3b_1node.sbatch.
# Paths come from the environment so one config serves every cluster:
#   TEACHER  diffusers WanTransformer3DModel folder (Wan2.1-T2V-1.3B-Diffusers/transformer)
#   DATA     shard directory from tools/prepare_data.py or tools/synthesize_data.py
#   VAE      optional: Wan VAE folder (Wan2.1-T2V-1.3B-Diffusers); set, TensorBoard gets decoded video samples
# Per GPU the flags fit one 80 GB H100 on their own (NPROC_PER_NODE=1: the batch of 64 is then 64
# micro-batches; tools/plan_memory.py --model wan-1.3b --gpus 1 --gpu-memory-gib 79 --latent-shape 16 21 60 104
# --micro-batch-size 1 estimates 70 GiB for the student step); examples/pipeline/run_pipeline.py runs them so.
: "${TEACHER:=/checkpoints/Wan2.1-T2V-1.3B-Diffusers/transformer}"
: "${DATA:=/data/wan-480p-81f/shards}"
: "${VAE:=}"
NPROC_PER_NODE=${NPROC_PER_NODE:-8}

TRAIN_ARGS=(
  --teacher-checkpoint "$TEACHER"
  --data "$DATA"
  --bf16
  # activations: keep one block's input per block and recompute it in backward (without it the
  # with-grad passes need ~140 GiB at 32,760 tokens); optimizer state sharded over the 8 GPUs
  --recompute-granularity full
  --recompute-num-layers 1
  --use-distributed-optimizer
  --method rcm
  # batch: 64 samples per iteration = 8 GPUs x 8 micro-batches of 1
  --micro-batch-size 1
  --global-batch-size 64
  --train-iters 10000
  # the paper's Wan 1.3B recipe (also the --model wan-1.3b method preset)
  --lr 2e-6
  --lr-fake-score 4e-7
  --student-update-freq 5
  --p-g "lognormal(0.7,1.6)"
  --p-d "uniform_shift(5)"
  --cfg-scale 5
  --rollout-max-steps 4
  --ema-sigma-rel 0.1
  --tangent-warmup-iters 1000
  # checkpoint often enough that one interval fits in the 300 s requeue lead (--signal). A checkpoint
  # is 45.4 GB (bf16 student + fake score, fp32 EMA, both models' fp32 main params and Adam moments;
  # no teacher): --keep-last 3 needs ~185 GB in --save (three kept + the one being written)
  --save-interval 50
  --keep-last 3
  --log-interval 10
)
# decoded 1/2/4-step student samples (and the teacher's once) in TensorBoard every 500 iterations
if [ -n "$VAE" ]; then TRAIN_ARGS+=(--log-video-interval 500 --vae "$VAE"); fi
