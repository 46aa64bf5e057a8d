"""The models of a run: the frozen teacher, the trained student and fake score (each this rank's
pipeline stage), their optimizer settings, their ``TrainedModel`` backends with lr schedulers,
and the share of the student's power EMA this rank keeps.

In ``--mode teacher`` the "student" is the teacher being pretrained (AdamW betas (0.9, 0.99),
``--teacher-lr``); there is no teacher and no fake score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels.fused_ops import set_fused_ops
from ..models import WanConfig, WanDiT, WanExperts
from .compile_policy import blocks_compiled
from ..parallel import state as pstate
from ..parallel.pipeline import stage_layer_range
from ..parallel.sharding import load_full_state_dict
from ..rcm import PowerEMA, RCMConfig
from ..rcm.ema import partition_names
from . import lr_schedule
from .arguments import TrainingConfig
from .rank_context import RankContext
from .trained_model import BackendContext, OptimizerSettings, TrainedModel, backend_name, build_trained_model

TEACHER_PRETRAINING_BETAS = (0.9, 0.99)


def peak_lrs(train: TrainingConfig, rcm: RCMConfig) -> tuple[float, float | None]:
    """Peak lr of the student (the teacher being pretrained in --mode teacher) and of the fake score."""
    if train.mode != "distill":
        return train.teacher_lr, None
    return rcm.lr_student, (rcm.lr_fake_score if rcm.uses_fake_score else None)


def optimizer_settings(train: TrainingConfig, rcm: RCMConfig, name: str) -> OptimizerSettings:
    """AdamW of ``name`` ('student' or 'fake_score'). Clipping: the local backend clips distillation
    only, megatron-core's optimizer every mode (as before the TrainedModel interface)."""
    distill = train.mode == "distill"
    lr_student, lr_fake = peak_lrs(train, rcm)
    lr = lr_student if name == "student" else lr_fake
    local = not train.use_distributed_optimizer
    return OptimizerSettings(
        lr=lr, min_lr=train.lr_schedule.min_lr if name == "student" else train.lr_schedule.min_lr * lr / lr_student,
        betas=tuple(rcm.adam_betas) if distill else TEACHER_PRETRAINING_BETAS, eps=rcm.adam_eps,
        weight_decay=rcm.weight_decay, clip_grad=rcm.grad_clip_norm if (distill or not local) else None)


def stage_model(cfg: WanConfig, ctx: RankContext, seed: int, weights: dict | None, trainable: bool) -> WanDiT:
    """This rank's pipeline stage of a model (the whole model at PP = 1), with the teacher's weights."""
    pipe = ctx.pipe
    m = WanDiT(cfg, pre_process=pipe.is_first, post_process=pipe.is_last,
               layer_range=stage_layer_range(cfg.num_layers, pipe.size, pipe.rank))
    m.reset_parameters(seed=seed)
    if weights is not None:
        load_full_state_dict(m, weights)
    m.requires_grad_(trainable)
    return m.to(ctx.device)


@dataclass
class Models:
    teacher: WanDiT | WanExperts | None
    student: WanDiT
    fake: WanDiT | None


def compile_wanted(train: TrainingConfig) -> bool:
    """--compile-blocks for this run's process groups (``blocks_compiled``)."""
    return blocks_compiled(train.compile_blocks, train.device, pstate.tensor_parallel_world_size(),
                           pstate.context_parallel_world_size(), train.recompute.granularity,
                           parameter_sharding=train.use_torch_fsdp2)


def frozen_teacher(train: TrainingConfig, cfg: WanConfig, ctx: RankContext, weights: dict | None) -> WanDiT:
    teacher = stage_model(cfg, ctx, train.seed, weights, trainable=False).eval()
    if train.bf16:
        teacher.to_dtype(torch.bfloat16)
    if train.fp8_teacher:
        teacher.quantize_fp8(*(1, 1) if train.first_last_layers_bf16 else (0, 0))  # Megatron-LM's default counts
    if train.use_torch_fsdp2:  # ZeRO-3: 1/n of the frozen teacher per DP x CP rank, gathered per block
        from ..parallel.fsdp import shard_model

        shard_model(teacher)
    return teacher


def build_models(train: TrainingConfig, rcm: RCMConfig, cfg: WanConfig, ctx: RankContext,
                 teacher_weights: dict | None, experts=None) -> Models:
    """``experts`` (a ``checkpointing.expert_source.ExpertTeacherSource``, whose ``weights`` are
    ``teacher_weights``, the --expert-init expert's): the teacher is a ``WanExperts``, each call routed
    per sample by its time (the TrigFlow wrapper's c_noise = 1000 sigma against boundary_ratio * 1000,
    as diffusers).

    Student and fake score stay ONE network each, by default (--expert-init low_noise) initialized
    from the LOW-noise expert; the toy measurement of high_noise is in docs/quality.md. Why: few-step
    sampling ends below the boundary (the last, detail-forming steps; at I2V's 0.9 about 2/3 of the
    sampled times lie there), so the student starts exact where its output is finally formed and
    learns the high-noise range (its first step) from the teacher's high-noise expert through sCM and
    DMD; the fake score tracks the student's outputs, which are low-noise samples, so it starts from
    the same expert. The price: above the boundary the student starts off the teacher (35% of p_d's
    times at I2V's 0.9), which sCM and DMD must close. One network keeps every layout, checkpoint and
    export path of a one-network run and one copy of the trained weights; the per-expert alternative
    is argued in ``rcm.conditioning``, not built here.
    """
    distill = train.mode == "distill"
    teacher = None
    if distill and experts is not None:
        teacher = WanExperts(frozen_teacher(train, cfg, ctx, experts.high_noise_weights),
                             frozen_teacher(train, cfg, ctx, experts.low_noise_weights), experts.boundary_ratio).eval()
    elif distill:
        teacher = frozen_teacher(train, cfg, ctx, teacher_weights)
    student = stage_model(cfg, ctx, train.seed, teacher_weights, trainable=True)
    fake = stage_model(cfg, ctx, train.seed, teacher_weights, trainable=True) \
        if distill and rcm.uses_fake_score else None
    for m in (student, fake):
        if m is not None:
            m.set_activation_recompute(train.recompute)
    set_fused_ops("auto" if train.fused_tangent_ops else "off")  # the no-grad passes' elementwise kernels
    if compile_wanted(train):
        teachers = (teacher.high_noise, teacher.low_noise) if isinstance(teacher, WanExperts) else (teacher,)
        for m in (*teachers, student, fake):
            if m is not None:
                m.compile_blocks()
    return Models(teacher, student, fake)


def build_trained_models(train: TrainingConfig, rcm: RCMConfig, cfg: WanConfig, par, ctx: RankContext,
                         models: Models) -> dict[str, TrainedModel]:
    """'student' (and 'fake_score') as TrainedModels of the chosen backend, each with its lr
    scheduler (lr_schedule.py; the step-0 lr is set)."""
    backend = backend_name(train.use_distributed_optimizer, train.use_torch_fsdp2)
    named = {"student": models.student, "fake_score": models.fake}
    if backend == "megatron" and train.bf16:  # megatron-core keeps fp32 main parameters itself
        for m in named.values():
            if m is not None:
                m.to_dtype(torch.bfloat16)
    lr_student, _ = peak_lrs(train, rcm)
    backend_ctx = BackendContext(pipe=ctx.pipe, grad_group=ctx.grad_group, model_cfg=cfg, par=par, bf16=train.bf16,
                                 overlap_grad_reduce=train.overlap_grad_reduce,
                                 overlap_param_gather=train.overlap_param_gather,
                                 cpu_offload=train.optimizer_cpu_offload)
    trained = {}
    for name, module in named.items():
        if module is None:
            continue
        opt = optimizer_settings(train, rcm, name)
        trained[name] = build_trained_model(backend, module, opt, backend_ctx)
    for name, tm in trained.items():
        peak = optimizer_settings(train, rcm, name).lr
        tm.scheduler = lr_schedule.build_scheduler(tm.optimizer, train.lr_schedule, max_lr=peak,
                                                   scale=peak / lr_student, weight_decay=rcm.weight_decay,
                                                   train_iters=train.train_iters)
    return trained


def sharded_ema(student: WanDiT, sigma_rel: float, group) -> PowerEMA:
    """The student's power EMA, this rank's size-balanced share of the tensors over DP x CP; under
    ZeRO-3 the student's parameters are already 1/n per rank: the shadow is their DTensor shards."""
    from ..parallel.fsdp import is_sharded

    if is_sharded(student):
        return PowerEMA(student, sigma_rel)
    sizes = {n: p.numel() for n, p in student.named_parameters()}
    names = partition_names(sizes, dist.get_world_size(group))[dist.get_rank(group)]
    return PowerEMA(student, sigma_rel, names=names)
