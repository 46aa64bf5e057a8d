"""Command-line flags of pretrain_rcm.py (Megatron-LM names) and their validation.

Everything that can be checked without building a model is checked here, so a bad flag,
file or shape ends the run with one line naming it (exit code 2) before any memory is
allocated or any checkpoint touched.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from ..cli import ArgumentParser
from ..data.datasets import DEFAULT_MAX_LATENT_MAGNITUDE, check_max_latent_magnitude
from ..models.config import PRESETS, WanConfig, preset
from ..models.recompute import GRANULARITIES, RECOMPUTE_MODULES, RecomputeConfig
from ..parallel.config import CP_COMM_TYPES, ParallelConfig
from ..rcm.config import MODES, TANGENT_WARMUP_FORMS, RCMConfig
from .lr_schedule import DECAY_STYLES, WSD_DECAY_STYLES, LRScheduleConfig
from .reporting import ReportingConfig, add_reporting_flags, reporting_config
from .trained_model import backend_flag_error
from .flag_names import METHOD_FLAGS, RENAMED_FLAGS, RENAMED_TYPES, flag_error


class ArgumentError(ValueError):
    """A user-facing configuration error; pretrain_rcm.py prints it and exits with code 2."""


# The embedded default (issue 10): with neither --model nor --teacher-checkpoint, distill the
# shipped toy teacher on the built-in toy video task (--data toy); --mode teacher pretrains a
# toy teacher from scratch. Method settings tuned for the toy task (docs/quality.md) apply to
# every --data toy distillation unless the flag is given.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TEACHER = os.path.join(REPO_ROOT, "assets", "toy_teacher.pt")
TOY_DEFAULTS = {"cfg_scale": 2.0, "lr_student": 3e-4, "lr_fake_score": 3e-4, "student_update_freq": 3,
                "tangent_warmup_iters": 0}
TOY_TRAIN_DEFAULTS = {"train_iters": 300, "micro_batch_size": 16}
TOY_DATA = ("toy", "toy-i2v")  # the toy task, and its image-to-video form (first frame given)
MAX_CONSECUTIVE_SKIPPED_STEPS = 10  # a diverged run stops within this many steps instead of running on

@dataclass
class TrainingConfig:
    mode: str  # "distill" or "teacher" (flow-matching pretraining of a teacher)
    train_iters: int
    seed: int
    data: str | None
    latent_shape: tuple[int, int, int, int] | None
    log_dir: str | None
    log_interval: int
    save: str | None
    save_interval: int | None
    load: str | None
    teacher_checkpoint: str | None
    bf16: bool
    device: str
    keep_last: int | None
    teacher_lr: float
    auto_resume: bool = False
    exit_duration_in_mins: float | None = None
    max_consecutive_skipped_steps: int | None = None
    log_images_interval: int | None = None
    use_distributed_optimizer: bool = False
    use_torch_fsdp2: bool = False  # ZeRO-3 (training/fsdp_backend.py)
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    optimizer_cpu_offload: bool = False
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    recompute: RecomputeConfig = RecomputeConfig()  # activation recompute of the with-grad passes
    compile_blocks: str = "auto"  # --compile-blocks auto|on|off (model_building.compile_wanted)
    fp8_teacher: bool = False  # the frozen teacher's block linears in FP8 (WanDiT.quantize_fp8)
    first_last_layers_bf16: bool = False  # with fp8_teacher: its first and last block stay out of FP8
    expert_init: str = "low_noise"  # which expert of a two-expert teacher starts student and fake score
    fused_tangent_ops: bool = True  # --[no-]fused-tangent-ops: fused Triton elementwise kernels, no-grad passes, CUDA
    ckpt_fully_parallel_save: bool = True  # DP-replicated tensors written by all DP ranks (checkpointing/save.py)
    max_latent_magnitude: float = DEFAULT_MAX_LATENT_MAGNITUDE  # larger |latent| values make a bad sample
    memory_check: bool = True  # --no-memory-check skips the memory plan check before building models
    reporting: ReportingConfig = ReportingConfig()  # decoded video samples, Weights & Biases
    model: str | None = None  # --model: the architecture preset (checked against --teacher-checkpoint's)
    implied: dict = field(default_factory=dict)  # flag -> value a preset or the teacher chose (printed at start)
    implied_by: str = ""  # what chose them


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="pretrain_rcm.py", description="rCM distillation of Wan2.1 DiTs (with no flags: "
                                                           "a tiny model on built-in data, on CPU).")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="architecture preset with a random-init teacher (default: the shipped toy teacher "
                        "assets/toy_teacher.pt); with --teacher-checkpoint it must name the checkpoint's "
                        "architecture (it then only selects the method preset)")
    g.add_argument("--teacher-checkpoint", default=None,
                   help="diffusers WanTransformer3DModel folder, original Wan2.1 .pth/.safetensors, an rcm-megatron "
                        "checkpoint directory (tools/convert_checkpoint.py import, or a --save dir: its EMA) or model file; "
                        "default assets/toy_teacher.pt when --model is not given")
    g.add_argument("--expert-init", choices=("low_noise", "high_noise"), default="low_noise",
                   help="two-expert teacher: the expert that initializes student and fake score (default low_noise)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters/activations (fp32 norms, time embedding)")
    g.add_argument("--recompute-granularity", choices=GRANULARITIES, default=None,
                   help="recompute in with-grad passes: full (groups of blocks) or selective (elementwise work)")
    g.add_argument("--recompute-method", choices=("uniform",), default="uniform",
                   help="uniform: checkpoint every group of --recompute-num-layers blocks")
    g.add_argument("--recompute-num-layers", type=int, default=1, help="blocks per group (full)")
    g.add_argument("--no-memory-check", action="store_true", help="skip the pre-build memory plan check (GPU or host RAM)")
    g.add_argument("--fp8-teacher", action="store_true", help="frozen teacher's block linears in FP8 (e4m3, row-wise scales)")
    g.add_argument("--first-last-layers-bf16", action="store_true", help="--fp8-teacher: first and last block not in FP8")
    g.add_argument("--compile-blocks", choices=("auto", "on", "off"), default="auto",
                   help="regional torch.compile of the DiT blocks; auto (default): CUDA without TP, CP, selective recompute")
    g.add_argument("--fused-tangent-ops", action=argparse.BooleanOptionalAction, default=True, help="fused Triton kernels")
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=["elementwise"],
                   help="selective: what is recomputed; core_attn also recomputes attention")
    g.add_argument("--mode", choices=("distill", "teacher"), default="distill",
                   help="distill a student (default) or pretrain a teacher by flow matching")
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=None,
                   help=f"default {TOY_TRAIN_DEFAULTS['train_iters']} on --data toy, else 100")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"default {TOY_TRAIN_DEFAULTS['micro_batch_size']} on --data toy, else 2")
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="student lr (default: method preset)")
    g.add_argument("--lr-fake-score", type=float, default=None, help="fake score lr (default: method preset)")
    g.add_argument("--teacher-lr", type=float, default=1e-3, help="lr of --mode teacher")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="constant",
                   help="learning-rate schedule of both trained models (the method's default: constant)")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup from --lr-warmup-init")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="student lr at the start of warmup")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="iterations to decay over (default --train-iters)")
    g.add_argument("--min-lr", type=float, default=0.0,
                   help="student lr at the end of the decay (the fake score's is scaled by its lr ratio)")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="annealing iterations of --lr-decay-style WSD")
    g.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES, default="exponential")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
                   dest="override_opt_param_scheduler",
                   help="on resume, use this run's schedule flags (from the checkpoint's step)")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler",
                   help="on resume, use the checkpoint's schedule and ignore this run's schedule flags")
    g.add_argument("--clip-grad", type=float, default=0.0, help="gradient norm clip (0 = none, the method's default)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="'toy' (default with --model toy), 'toy-i2v', 'synthetic' (default "
                   "otherwise), a .pt latent file or a shard folder")
    g.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), default=None,
                   help="latent shape of the built-in synthetic data (default C=in_channels, 3, 8, 8)")
    g.add_argument("--max-latent-magnitude", type=float, default=DEFAULT_MAX_LATENT_MAGNITUDE,
                   help="a sample with a latent beyond this is bad: skipped and counted (latents ~ unit variance)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-dir", default="runs/default")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--save", default=None, help="checkpoint dir (default LOG_DIR/checkpoints when neither --model "
                                                  "nor --teacher-checkpoint is given, else none)")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest K checkpoints")
    g.add_argument("--ckpt-fully-parallel-save", action=argparse.BooleanOptionalAction, default=True, help="DP ranks share writes")
    g.add_argument("--auto-resume", action="store_true",
                   help="resume from the newest complete checkpoint in --save if there is one (SLURM requeue)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit cleanly after this many minutes (job time limits)")
    g.add_argument("--max-consecutive-skipped-steps", type=int, default=MAX_CONSECUTIVE_SKIPPED_STEPS,
                   help="abort (exit 1, no save) after this many consecutive steps with non-finite gradients "
                        f"(default {MAX_CONSECUTIVE_SKIPPED_STEPS}; 0: never)")
    g.add_argument("--log-images-interval", type=int, default=None, help="TensorBoard latent grids every N iterations")
    add_reporting_flags(g)
    g = p.add_argument_group("method (rCM)")
    g.add_argument("--method", choices=MODES, default="rcm", help="rcm, or the scm / dmd / dcm baselines")
    g.add_argument("--cfg-scale", type=float, default=None)
    g.add_argument("--student-update-freq", type=int, default=None)
    g.add_argument("--tangent-warmup-iters", type=int, default=None,
                   help="iterations of sCM tangent warmup (Wan presets: 1000 for 1.3B, 300 for 14B, the official recipes)")
    g.add_argument("--tangent-warmup-form", choices=TANGENT_WARMUP_FORMS, default=None,
                   help="how the warmup ratio r enters the sCM tangent: f9b7be9 (default; the official code since "
                        "NVlabs/rcm commit f9b7be9, r scales only the x_t term) or pre-f9b7be9 (r scales dF too)")
    g.add_argument("--scm-loss-scale", type=float, default=None)
    g.add_argument("--dmd-loss-scale", type=float, default=None)
    g.add_argument("--p-g", default=None, help="sCM time sampler, e.g. 'lognormal(0.7,1.6)'")
    g.add_argument("--p-d", default=None, help="DMD/critic/rollout time sampler, e.g. 'uniform_shift(5)'")
    g.add_argument("--rollout-max-steps", type=int, default=None, help="max student rollout steps (1..4)")
    g.add_argument("--ema-sigma-rel", type=float, default=None, help="power-EMA relative width (0.1 official, 0.05 paper)")
    for old, new in RENAMED_FLAGS.items():  # earlier spellings, still accepted, not in --help
        p.add_argument(old, dest=new[2:].replace("-", "_"), type=RENAMED_TYPES[new], default=None,
                       help=argparse.SUPPRESS)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", choices=CP_COMM_TYPES, default="p2p",
                   help="context-parallel attention: a2a (Ulysses; heads/TP divisible by CP), p2p (ring; any "
                        "CP size) or a2a+p2p (a2a inside groups of A ranks, ring across B)")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs=2, metavar=("A", "B"), default=None,
                   help="with --cp-comm-type a2a+p2p: all-to-all size A x ring size B = --context-parallel-size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="a collective (NCCL/gloo) that waits longer aborts the job instead of hanging it")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="GPU: megatron-core DDP + dist. optimizer")
    for flag in ("--overlap-grad-reduce", "--overlap-param-gather"):
        g.add_argument(flag, action="store_true", help="with --use-distributed-optimizer")
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="with --use-distributed-optimizer or --use-torch-fsdp2")
    g.add_argument("--use-torch-fsdp2", action="store_true",
                   help="ZeRO-3: teacher, student, fake score sharded over DP x CP (torch FSDP2), any device")
    return p


def _positive(name: str, v, allow_none=False):
    if v is None and allow_none:
        return
    if v is None or v < 1:
        raise ArgumentError(f"{name} must be a positive integer, got {v}")


def _checked(check, *args):
    """``check(*args)``, its ValueError as an ArgumentError."""
    try:
        return check(*args)
    except ValueError as e:
        raise ArgumentError(str(e)) from e


def parse_args(argv=None):
    """Parse and validate; returns (TrainingConfig, WanConfig | None, RCMConfig, ParallelConfig).

    The model config is None when it will come from --teacher-checkpoint (read later,
    after the file was checked to exist here).
    """
    args = build_parser().parse_args(argv)
    implied, implied_by = _apply_toy_defaults(args)
    for name, optional in (("train_iters", False), ("micro_batch_size", False), ("global_batch_size", True),
                           ("log_interval", False), ("recompute_num_layers", False), ("save_interval", True), ("keep_last", True)):
        _positive("--" + name.replace("_", "-"), getattr(args, name), allow_none=optional)
    _checked(check_max_latent_magnitude, args.max_latent_magnitude)
    if args.max_consecutive_skipped_steps < 0:
        raise ArgumentError(f"--max-consecutive-skipped-steps must be >= 0 (0: never abort), got "
                            f"{args.max_consecutive_skipped_steps}")
    if args.clip_grad < 0:
        raise ArgumentError(f"--clip-grad must be >= 0 (0: no clipping), got {args.clip_grad:g}")
    if args.mode == "teacher" and not args.teacher_lr > 0:
        raise ArgumentError(f"--teacher-lr must be > 0, got {args.teacher_lr:g}")
    _positive("--log-images-interval", args.log_images_interval, allow_none=True)
    reporting = _checked(reporting_config, args)
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise ArgumentError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if args.auto_resume and args.save is None:
        raise ArgumentError("--auto-resume needs --save DIR (where checkpoints are looked for)")
    if args.teacher_checkpoint is not None and not os.path.exists(args.teacher_checkpoint):
        raise ArgumentError(f"--teacher-checkpoint {args.teacher_checkpoint}: no such file or directory")
    if args.load is not None and not os.path.isdir(args.load):
        raise ArgumentError(f"--load {args.load}: no such checkpoint directory")
    from ..data.shards import is_shard_spec

    if args.data not in (None, "synthetic", *TOY_DATA) and not os.path.isfile(args.data) and not is_shard_spec(args.data):
        raise ArgumentError(f"--data {args.data}: no such file (expected 'synthetic', 'toy', 'toy-i2v' or a .pt latent file)")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.device not in (None, "cpu", "cuda"):
        raise ArgumentError(f"--device must be cpu or cuda, got {args.device!r}")
    device = args.device or ("cuda" if _cuda() else "cpu")
    if (line := backend_flag_error(args, device)) is not None:
        raise ArgumentError(line)
    if device == "cuda" and not _cuda():
        raise ArgumentError("--device cuda: no CUDA device is available")

    model_cfg: WanConfig | None = None
    if args.teacher_checkpoint is None:
        model_cfg = preset(args.model or "tiny")
    if args.latent_shape is not None and min(args.latent_shape) < 1:
        raise ArgumentError(f"--latent-shape must be four positive ints, got {args.latent_shape}")
    if args.latent_shape is not None and args.data not in (None, "synthetic", *TOY_DATA):
        raise ArgumentError(f"--latent-shape would be ignored: --data {args.data} has its own latent shape")

    sizes = {"--tensor-model-parallel-size": args.tensor_model_parallel_size,
             "--context-parallel-size": args.context_parallel_size,
             "--pipeline-model-parallel-size": args.pipeline_model_parallel_size}
    procs = args.tensor_model_parallel_size * args.context_parallel_size * args.pipeline_model_parallel_size
    try:
        par = ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size, sequence_parallel=args.sequence_parallel,
            context_parallel_size=args.context_parallel_size, cp_comm_type=args.cp_comm_type,
            hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            distributed_timeout_minutes=args.distributed_timeout_minutes)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        par.resolve_batch(world)
    except ValueError as e:
        hint = ""
        if procs > 1 and "WORLD_SIZE" not in os.environ:  # a plain `python pretrain_rcm.py`: say how to launch
            given = " ".join(f"{k} {v}" for k, v in sizes.items() if v > 1)
            hint = (f"; {given} needs {procs} processes (or a multiple): launch with torchrun --nproc-per-node "
                    f"{procs} pretrain_rcm.py ...")
        raise ArgumentError(str(e) + hint) from e

    preset_name = "wan-14b" if (args.model == "wan-14b") else "wan-1.3b"
    overrides = {k: v for k, v in {
        "method": args.method, "seed": args.seed, "cfg_scale": args.cfg_scale,
        "student_update_freq": args.student_update_freq, "tangent_warmup_iters": args.tangent_warmup_iters,
        "tangent_warmup_form": args.tangent_warmup_form,
        "scm_loss_scale": args.scm_loss_scale, "dmd_loss_scale": args.dmd_loss_scale, "p_g": args.p_g,
        "p_d": args.p_d, "rollout_max_steps": args.rollout_max_steps, "ema_sigma_rel": args.ema_sigma_rel,
        "lr_student": args.lr, "lr_fake_score": args.lr_fake_score, "weight_decay": args.weight_decay,
        "grad_clip_norm": args.clip_grad if args.clip_grad > 0 else None,
    }.items() if v is not None}
    if args.clip_grad == 0:
        overrides["grad_clip_norm"] = None
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise ArgumentError("--lr-warmup-fraction and --lr-warmup-iters exclude each other")
    given = set(overrides)
    if args.data in TOY_DATA and args.mode == "distill":
        for key, value in TOY_DEFAULTS.items():
            overrides.setdefault(key, value)
    if args.model == "tiny" and args.teacher_checkpoint is None:
        # The embedded default: a tiny random teacher learns nothing at Wan's lr in minutes.
        overrides.setdefault("lr_student", 1e-4)
        overrides.setdefault("lr_fake_score", 1e-4)
    if args.model == "tiny":  # a smoke model: show both phases from the first iterations
        overrides.setdefault("tangent_warmup_iters", 0)
    try:
        rcm_cfg = RCMConfig.preset(preset_name, **overrides)
    except ValueError as e:
        raise ArgumentError(flag_error(str(e), given)) from e
    if args.mode == "distill":
        implied.update({flag: getattr(rcm_cfg, f) for f, flag in METHOD_FLAGS.items() if f not in given})

    peak_lr = args.teacher_lr if args.mode == "teacher" else rcm_cfg.lr_student
    decay_iters = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        if not 0 <= args.lr_warmup_fraction < 1:
            raise ArgumentError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
        warmup = int(args.lr_warmup_fraction * decay_iters)
    schedule = LRScheduleConfig(
        decay_style=args.lr_decay_style, warmup_iters=warmup, warmup_init=args.lr_warmup_init,
        decay_iters=args.lr_decay_iters, min_lr=args.min_lr, wsd_decay_iters=args.lr_wsd_decay_iters,
        wsd_decay_style=args.lr_wsd_decay_style, override=args.override_opt_param_scheduler,
        use_checkpoint=args.use_checkpoint_opt_param_scheduler)
    _checked(schedule.validate, peak_lr, args.train_iters)

    train = TrainingConfig(
        mode=args.mode, train_iters=args.train_iters, seed=args.seed, data=args.data,
        latent_shape=tuple(args.latent_shape) if args.latent_shape else None, log_dir=args.log_dir,
        log_interval=args.log_interval, save=args.save, save_interval=args.save_interval, load=args.load,
        teacher_checkpoint=args.teacher_checkpoint, bf16=args.bf16, device=device, keep_last=args.keep_last,
        teacher_lr=args.teacher_lr, auto_resume=args.auto_resume, exit_duration_in_mins=args.exit_duration_in_mins,
        max_consecutive_skipped_steps=args.max_consecutive_skipped_steps, log_images_interval=args.log_images_interval,
        use_distributed_optimizer=args.use_distributed_optimizer, use_torch_fsdp2=args.use_torch_fsdp2,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        optimizer_cpu_offload=args.optimizer_cpu_offload, expert_init=args.expert_init,
        lr_schedule=schedule, recompute=RecomputeConfig(args.recompute_granularity, args.recompute_num_layers,
                                                        tuple(args.recompute_modules)),
        compile_blocks=args.compile_blocks, fp8_teacher=args.fp8_teacher, first_last_layers_bf16=args.first_last_layers_bf16,
        fused_tangent_ops=args.fused_tangent_ops, ckpt_fully_parallel_save=args.ckpt_fully_parallel_save,
        memory_check=not args.no_memory_check, max_latent_magnitude=args.max_latent_magnitude, reporting=reporting,
        model=args.model, implied=implied, implied_by=implied_by)
    return train, model_cfg, rcm_cfg, par


def _apply_toy_defaults(args) -> tuple[dict, str]:
    """Resolve the toy task's defaults (see TOY_DEFAULTS); returns the settings chosen here (flag -> value) and by what."""
    if args.teacher_checkpoint is not None and args.model is None and args.mode == "distill" \
            and os.path.isfile(DEFAULT_TEACHER) \
            and os.path.exists(args.teacher_checkpoint) and os.path.samefile(args.teacher_checkpoint, DEFAULT_TEACHER):
        args.teacher_checkpoint = None  # naming the shipped teacher is the default run
    before = {k: getattr(args, k) for k in ("teacher_checkpoint", "model", "save", "data", "train_iters", "micro_batch_size")}
    implied_by = (f"--model {args.model}" if args.model else f"--teacher-checkpoint {args.teacher_checkpoint}"
                  if args.teacher_checkpoint else "the default run (the shipped toy teacher, the toy video task)"
                  if args.mode == "distill" else "the default run of --mode teacher (the toy preset and task)")
    if args.model is None and args.teacher_checkpoint is None:
        if args.mode == "distill":
            if not os.path.isfile(DEFAULT_TEACHER):
                raise ArgumentError(f"the default teacher {DEFAULT_TEACHER} is missing (it ships with the repository; "
                                    "restore it with git, pass --teacher-checkpoint PATH, or --model tiny for a "
                                    "random teacher)")
            args.teacher_checkpoint = DEFAULT_TEACHER
        else:
            args.model = "toy"
        if args.save is None:
            args.save = os.path.join(args.log_dir, "checkpoints")
        if args.data is None:
            args.data = "toy"
    elif args.model == "toy" and args.data is None:
        args.data = "toy"
    toy = args.data in TOY_DATA
    if args.train_iters is None:
        args.train_iters = TOY_TRAIN_DEFAULTS["train_iters"] if toy and args.mode == "distill" else 100
    if args.micro_batch_size is None:
        args.micro_batch_size = TOY_TRAIN_DEFAULTS["micro_batch_size"] if toy else 2
    implied = {"--" + k.replace("_", "-"): getattr(args, k) for k, v in before.items() if getattr(args, k) != v}
    if args.data is None:
        implied["--data"] = "synthetic"
    return implied, implied_by


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
