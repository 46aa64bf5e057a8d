"""One model being trained: its network, optimizer and lr scheduler, behind one interface.

The trainer sees every trained model (the student, the fake score; in ``--mode teacher`` the
teacher being pretrained) the same way:

- ``net``: what the rCM step functions call (forward passes through the backend's wrapper,
  so its gradient hooks run; tangent passes straight to the module);
- ``zero_grad()``, ``accumulate()`` (the context of one micro-batch's backward passes) and
  ``step() -> (stepped, grad_norm)``: gradients reduced over DP x CP, the global norm (every
  parameter counted once over TP and PP), clipping to ``--clip-grad``, and the optimizer step,
  skipped when the norm is not finite;
- ``optimizer_sharded_state_dict`` / ``load_optimizer_state_dict`` for checkpoints, and
  ``optimizer_format``, recorded in them (a resume must use the same backend).

Backends: ``LocalDataParallel`` (``local_dp.py``; torch AdamW with torch.distributed
reductions, any device, the CPU path), ``MegatronDP`` (``megatron_dp.py``; megatron-core
DDP + distributed optimizer, ``--use-distributed-optimizer``) and ``FSDPDataParallel``
(``fsdp_backend.py``; ZeRO-3 with torch FSDP2, ``--use-torch-fsdp2``, any device). A backend
plugs in by subclassing ``TrainedModel`` and adding a builder to ``BACKENDS``: it gets the
module (this rank's pipeline stage), its ``OptimizerSettings`` and a ``BackendContext``; its
``net`` may be the sharded module itself, ``optimizer`` must have ``param_groups`` (the lr
scheduler drives them) and ``optimizer_format`` names its checkpoint layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and clipping of one trained model (lr is the peak; the scheduler sets the lr)."""

    lr: float
    min_lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    clip_grad: float | None  # None: no clipping


class TrainedModel:
    """Base of the backends: holds the module, its optimizer and (once built) its scheduler."""

    optimizer_format = "unknown"

    def __init__(self, module: torch.nn.Module, optimizer, net=None):
        self.module, self.optimizer = module, optimizer
        self.net = module if net is None else net
        self.scheduler = None  # set by the trainer (lr_schedule.build_scheduler on self.optimizer)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        raise NotImplementedError

    def accumulate(self):
        """Context around one micro-batch's forward and backward passes."""
        return contextlib.nullcontext()

    def step(self) -> tuple[bool, float]:
        """Reduce gradients, clip, step; returns (stepped, grad_norm). Not stepped: non-finite norm."""
        raise NotImplementedError

    def optimizer_sharded_state_dict(self, prefix: str, is_loading: bool = False) -> dict:
        raise NotImplementedError

    def load_optimizer_state_dict(self, loaded: dict) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class BackendContext:
    """What a backend may need besides the module and its optimizer settings."""

    pipe: object  # parallel.pipeline.PipelineLayout of this rank
    grad_group: object | None  # DP x CP process group, None when this rank is alone in it
    model_cfg: object = None  # models.WanConfig
    par: object = None  # parallel.config.ParallelConfig
    bf16: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    cpu_offload: bool = False


def _local(module, opt: OptimizerSettings, ctx: BackendContext) -> TrainedModel:
    from .local_dp import LocalDataParallel

    return LocalDataParallel(module, opt, grad_group=ctx.grad_group, pipe=ctx.pipe)


def _megatron(module, opt: OptimizerSettings, ctx: BackendContext) -> TrainedModel:
    from .megatron_dp import MegatronDP

    return MegatronDP(module, ctx.model_cfg, ctx.par, lr=opt.lr, min_lr=opt.min_lr, betas=opt.betas, eps=opt.eps,
                      weight_decay=opt.weight_decay, clip_grad=opt.clip_grad, bf16=ctx.bf16,
                      overlap_grad_reduce=ctx.overlap_grad_reduce, overlap_param_gather=ctx.overlap_param_gather,
                      cpu_offload=ctx.cpu_offload, pipeline_first_stage=ctx.pipe.is_first)


def _fsdp(module, opt: OptimizerSettings, ctx: BackendContext) -> TrainedModel:
    from .fsdp_backend import FSDPDataParallel

    return FSDPDataParallel(module, opt, pipe=ctx.pipe, param_dtype=torch.bfloat16 if ctx.bf16 else None,
                            cpu_offload=ctx.cpu_offload)


# name -> builder(module, OptimizerSettings, BackendContext) -> TrainedModel; a new backend adds one entry.
BACKENDS = {"local": _local, "megatron": _megatron, "fsdp": _fsdp}


def backend_name(use_distributed_optimizer: bool, use_torch_fsdp2: bool = False) -> str:
    return "fsdp" if use_torch_fsdp2 else ("megatron" if use_distributed_optimizer else "local")


def backend_flag_error(args, device: str) -> str | None:
    """One line when the data-parallel backend flags (pretrain_rcm's parsed ``args``) conflict, else None."""
    fsdp2, dist_opt = getattr(args, "use_torch_fsdp2", False), args.use_distributed_optimizer
    if fsdp2 and dist_opt:
        return ("--use-torch-fsdp2 and --use-distributed-optimizer exclude each other (ZeRO-3 shards the "
                "parameters, gradients and optimizer state itself): pick one")
    if fsdp2 and (args.overlap_grad_reduce or args.overlap_param_gather):
        return "--overlap-grad-reduce / --overlap-param-gather are --use-distributed-optimizer's; FSDP2 overlaps " \
               "its gathers and reduce-scatters itself"
    if getattr(args, "first_last_layers_bf16", False) and not getattr(args, "fp8_teacher", False):
        return "--first-last-layers-bf16 keeps the first and last block of the --fp8-teacher teacher out of FP8: add --fp8-teacher"
    if getattr(args, "fp8_teacher", False):
        from ..kernels.fp8 import fp8_teacher_flag_error

        cuda = device == "cuda" and torch.cuda.is_available()
        capability = torch.cuda.get_device_capability() if cuda else None
        if (line := fp8_teacher_flag_error(args.mode, fsdp2, capability)) is not None:
            return line
    if (args.overlap_grad_reduce or args.overlap_param_gather or args.optimizer_cpu_offload) and not (dist_opt or fsdp2):
        return ("--overlap-grad-reduce / --overlap-param-gather / --optimizer-cpu-offload need "
                "--use-distributed-optimizer (--optimizer-cpu-offload also --use-torch-fsdp2)")
    if dist_opt and device != "cuda":
        return ("--use-distributed-optimizer needs CUDA (megatron-core's DDP and distributed optimizer); "
                "without it the CPU path reduces gradients over DP x CP with the same semantics")
    return None


def build_trained_model(backend: str, module, opt: OptimizerSettings, ctx: BackendContext) -> TrainedModel:
    """The backend's TrainedModel for ``module`` (this rank's pipeline stage of the model)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown trained-model backend {backend!r} (expected one of {sorted(BACKENDS)})")
    return BACKENDS[backend](module, opt, ctx)
