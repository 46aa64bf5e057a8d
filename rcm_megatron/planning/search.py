"""Layouts that fit N GPUs of M GiB, best first; and the pre-flight check of a run.

A layout fits when its largest phase (student step or critic step) leaves ``headroom`` of the
card free. Best = the shortest mean iteration at the workload's global batch among those that
fit (ties: less memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..parallel.context_parallel import validate_cp
from ..parallel.tensor_parallel import validate_tp
from ..training.compile_policy import blocks_compiled
from .layout import Layout, Workload
from .memory import GIB, MemoryAssumptions, MemoryPlan, plan_memory
from .step_time import TimeAssumptions, step_seconds


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryPlan
    seconds: dict[str, float]
    capacity: float

    @property
    def headroom(self) -> float:
        return 1 - self.memory.peak / self.capacity


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(w: Workload, gpus: int, max_tp: int = 8, zero_levels=(1, 3),
                      micro_batch_size: int = 1) -> list[Layout]:
    """Every valid layout of ``gpus`` ranks: TP within a node (dividing heads, width, FFN), CP
    with all-to-all where heads / TP allow it (else ring), PP dividing the blocks, recompute on
    or off, offload on or off, ZeRO levels ``zero_levels``."""
    cfg = w.model
    out = []
    for tp in (t for t in _divisors(gpus) if t <= max_tp):
        try:
            validate_tp(cfg, tp)
        except ValueError:
            continue
        for cp in _divisors(gpus // tp):
            comm = "a2a" if (cfg.num_attention_heads // tp) % cp == 0 else "p2p"
            try:
                validate_cp(cfg, tp, cp, comm)
            except ValueError:
                continue
            for pp in _divisors(gpus // (tp * cp)):
                if cfg.num_layers % pp:
                    continue
                dp = gpus // (tp * cp * pp)
                micro = _micro_batches(w, dp, micro_batch_size, pp)
                if micro is None:
                    continue
                for zero in zero_levels:
                    for recompute in (0, 1):
                        for offload in ((False, True) if zero else (False,)):
                            out.append(Layout(tp=tp, cp=cp, pp=pp, dp=dp, cp_comm_type=comm, zero=zero,
                                              micro_batch_size=micro_batch_size, num_micro_batches=micro,
                                              recompute_num_layers=recompute, optimizer_cpu_offload=offload))
    return out


def _micro_batches(w: Workload, dp: int, mbs: int, pp: int) -> Optional[int]:
    if w.global_batch_size is None:
        raise ValueError("a layout search needs Workload.global_batch_size (layouts are compared at one global batch)")
    if w.global_batch_size % (mbs * dp):
        return None
    return w.global_batch_size // (mbs * dp)


def evaluate(w: Workload, lay: Layout, gpu_memory_gib: float, mem: MemoryAssumptions = MemoryAssumptions(),
             time: TimeAssumptions = TimeAssumptions()) -> Candidate:
    return Candidate(lay, plan_memory(w, lay, mem), step_seconds(w, lay, time), gpu_memory_gib * GIB)


def fitting_layouts(w: Workload, gpus: int, gpu_memory_gib: float, headroom: float = 0.1,
                    host_memory_gib_per_gpu: float | None = None, **kw) -> list[Candidate]:
    """Candidates that fit, best first."""
    fits = []
    for lay in candidate_layouts(w, gpus, **kw):
        c = evaluate(w, lay, gpu_memory_gib)
        if c.headroom < headroom:
            continue
        if host_memory_gib_per_gpu is not None and c.memory.host_bytes > host_memory_gib_per_gpu * GIB:
            continue
        fits.append(c)
    fits.sort(key=lambda c: (round(c.seconds["iteration"], 3), c.memory.peak))  # same global batch for all
    return fits


def check_fits(args, model_cfg=None, world_size: int | None = None, gpu_memory_gib: float | None = None,
               headroom: float = 0.0) -> Optional[str]:
    """None when the run's layout fits its GPU, else one line: the estimated need, what is
    available, and the flags of the best layout that would fit. pretrain_rcm calls it before
    building any model: ``line = check_fits(args, model_cfg, world_size)``; a line is printed to
    stderr and the run exits with code 2. ``args``: pretrain_rcm's parsed
    flags (attribute names as argparse makes them); the model is ``model_cfg`` or ``--model``'s
    preset; the GPU's memory is read from CUDA unless given. Returns None when nothing can be
    checked or ``--no-memory-check`` is set. On CPU the host's RAM per local rank is the capacity."""
    if getattr(args, "no_memory_check", False):
        return None
    import torch

    from ..models.config import preset

    where = "the GPU"
    if gpu_memory_gib is None:
        if torch.cuda.is_available() and getattr(args, "device", None) != "cpu":
            gpu_memory_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
        else:  # CPU run: the host's memory, shared by this node's ranks
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            gpu_memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / max(1, local)
            where = "host RAM per rank"
    cfg = model_cfg if model_cfg is not None else preset(args.model)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    w, lay = workload_and_layout(args, cfg, world)
    c = evaluate(w, lay, gpu_memory_gib)
    if c.headroom >= headroom:
        return None
    need = c.memory.peak / GIB
    line = (f"memory plan: this layout needs about {need:.1f} GiB per GPU ({lay.flags()}), "
            f"{where} has {gpu_memory_gib:.1f} GiB")
    better = fitting_layouts(w, world, gpu_memory_gib, headroom=max(headroom, 0.0))
    if better:
        line += f"; fits: {better[0].layout.flags()} ({better[0].memory.peak / GIB:.1f} GiB)"
    else:
        line += f"; no layout of {world} GPUs fits (tools/plan_memory.py lists what more GPUs allow)"
    return line + "; --no-memory-check skips this check"


def check_host_memory(args, model_cfg, what: str, available_bytes: float | None = None) -> Optional[str]:
    """A CPU run's pre-flight check: None when the memory plan of this run's ranks on this host
    (torchrun's LOCAL_WORLD_SIZE; each rank's peak plus what it keeps on the host) fits the host's
    available RAM, else one line naming ``what`` (the model's flag). Checked before any model is
    allocated, so ``--model wan-14b`` on a CPU machine ends with a line, not the OOM killer."""
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    w, lay = workload_and_layout(args, model_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    plan = plan_memory(w, lay, MemoryAssumptions(cuda_context_gib=0.0, collective_workspace_gib=0.0))
    need = local * (plan.peak + plan.host_bytes)
    have = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if need <= have:
        return None
    from .params import count, stage_shapes

    n = sum(count(stage_shapes(model_cfg)))
    return (f"{what}: a CPU run needs about {need / GIB:.0f} GiB of host memory (models, gradients, EMA, AdamW "
            f"state and activations of {n / 1e6:,.1f}M parameters, tools/plan_memory.py's plan), "
            f"{have / GIB:.0f} GiB are available; train it on GPUs (--device cuda, model parallel under torchrun) "
            "or pick a smaller --model")


def workload_and_layout(args, cfg, world_size: int) -> tuple[Workload, Layout]:
    """The Workload and Layout of pretrain_rcm's flags."""
    def g(name, default=None):
        value = getattr(args, name, None)
        return default if value is None else value

    tp, cp, pp = g("tensor_model_parallel_size", 1), g("context_parallel_size", 1), g("pipeline_model_parallel_size", 1)
    mbs = g("micro_batch_size", 1)
    dp = max(1, world_size // (tp * cp * pp))
    gbs = g("global_batch_size", mbs * dp)
    latent = tuple(g("latent_shape", (cfg.in_channels, 21, 60, 104)))
    zero = 3 if g("use_torch_fsdp2", False) or g("data_parallel_sharding_strategy") == "optim_grads_params" else \
        (1 if g("use_distributed_optimizer", False) else 0)
    recompute = g("recompute_num_layers", 1) if g("recompute_granularity") == "full" else 0
    w = Workload(cfg, latent, text_len=g("text_len", 512), bf16=bool(g("bf16", False)), method=g("method", "rcm"),
                 rollout_max_steps=g("rollout_max_steps", 4), student_update_freq=g("student_update_freq", 10),
                 global_batch_size=gbs, mode=g("mode", "distill"), fp8_teacher=bool(g("fp8_teacher", False)),
                 teacher_experts=g("teacher_experts", 1),
                 first_last_layers_bf16=bool(g("first_last_layers_bf16", False)))
    lay = Layout(tp=tp, cp=cp, pp=pp, dp=dp, sequence_parallel=bool(g("sequence_parallel", False)),
                 cp_comm_type=g("cp_comm_type", "p2p"), zero=zero, micro_batch_size=mbs,
                 num_micro_batches=max(1, gbs // (mbs * dp)), recompute_num_layers=recompute,
                 optimizer_cpu_offload=bool(g("optimizer_cpu_offload", False)) and zero > 0,
                 compiled_blocks=blocks_compiled(g("compile_blocks", "off"), g("device", "cpu"), tp, cp,
                                                 g("recompute_granularity"), parameter_sharding=zero == 3))
    return w, lay
