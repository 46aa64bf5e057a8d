"""Per-GPU memory of an rCM iteration at a layout: model states, activations, buffers.

Model states follow how the trainer stores each model (training/trainer.py, megatron_dp.py,
rcm/ema.py), per rank of a pipeline stage, P = this rank's parameters (P16 in the compute
dtype, P32 kept in fp32), n = DP x CP:

    teacher (frozen)         zero 0/1: 2 P16 + 4 P32              zero 3: that / n (FSDP2 shards)
                             x 2 for a two-expert teacher (Wan2.2 A14B: both experts on every rank)
                             --fp8-teacher: block-linear weights 1 byte each + a 4-byte scale per row
    student, fake score      zero 0: fp32 parameters 4P, fp32 grads 4P, AdamW moments 8P, and
                             autocast's bf16 weight copies 2 P16 while the model runs
                             zero 1: 2 P16 + 4 P32 parameters, fp32 grad buffer 4P, fp32 main
                             parameters 4 P16 / n (fp32 parameters are their own main copy),
                             moments 8P / n (optimizer CPU offload: main + moments on the host)
                             zero 3: fp32 shards 4P/n, fp32 grad shards 4P/n, moments 8P/n
                             (CPU offload: all three on the host); the block being computed is
                             gathered in bf16, the next one prefetched, and with grad its fp32
                             gradient is reduce-scattered; the root unit (embeddings, head)
                             stays gathered through a pass; the forward-only passes (rollout,
                             tangent) keep the whole student gathered (DP ranks roll out
                             different step counts, and gathers are collectives)
    student EMA              fp32 shadow, whole tensors size-balanced over n (rcm.ema)

Activations (planning.activations) are per pass; a phase's peak is its largest pass. Under
pipeline parallelism the 1F1B with-grad pass holds min(PP, micro-batches) micro-batches on the
first stage; forward-only sweeps hold one. Communication buffers: the pipeline's send/receive
messages and a fixed collective workspace. The allocator's fragmentation is a fraction of the
peak, and the CUDA context is outside the allocator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..parallel.pipeline import stage_layer_range
from ..rcm.ema import partition_names
from .activations import PassMemory, RankShape, no_grad_pass, with_grad_pass
from .layout import Layout, Workload
from .params import block_shapes, count, fsdp_shard_numel, stage_shapes

GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryAssumptions:
    """Constants that are not counted from the code (defaults: measured or conventional)."""

    allocator_fraction: float = 0.05  # reserved beyond allocated (PyTorch caching allocator)
    cuda_context_gib: float = 0.6  # CUDA context + cuBLAS/NCCL handles, outside the allocator
    collective_workspace_gib: float = 0.25  # NCCL buffers per communicator in use


@dataclass
class MemoryPlan:
    """Bytes per GPU of the worst pipeline stage, by item; ``peak`` the largest phase."""

    states: dict[str, float]
    host_states: dict[str, float]
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    stage: int = 0

    @property
    def phase_totals(self) -> dict[str, float]:
        return {name: sum(items.values()) for name, items in self.phases.items()}

    @property
    def peak(self) -> float:
        return max(self.phase_totals.values())

    @property
    def host_bytes(self) -> float:
        return sum(self.host_states.values())


def _stage_shapes(w: Workload, lay: Layout, stage: int):
    rng = stage_layer_range(w.model.num_layers, lay.pp, stage)
    return rng, stage_shapes(w.model, lay.tp, stage == 0, stage == lay.pp - 1, rng, w.bf16)


def model_states(w: Workload, lay: Layout, stage: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """(GPU bytes, host bytes) of the model states of one rank of ``stage`` (module docstring)."""
    (first, last), shapes = _stage_shapes(w, lay, stage)
    p32, p16 = count(shapes)
    n = lay.shard_group
    compute = 2 if w.bf16 else 4
    weights = compute * p16 + 4 * p32
    gpu, host = {}, {}
    sharded = sum(fsdp_shard_numel(s.shape, n) for s in shapes.values())
    sharded32 = sum(fsdp_shard_numel(s.shape, n) for s in shapes.values() if s.keep_fp32)
    trained = ["student"] + (["fake_score"] if w.uses_fake_score else [])
    if w.mode == "distill":
        gpu["teacher"] = weights if lay.zero < 3 else compute * (sharded - sharded32) + 4 * sharded32
        if w.fp8_teacher:  # WanDiT.quantize_fp8: 1 byte per block-linear weight + one fp32 scale per row
            gpu["teacher"] -= sum((compute - 1) * s.numel - 4 * s.shape[0]
                                  for n, s in shapes.items() if fp8_weight(n, s, w))
        gpu["teacher"] *= w.teacher_experts  # models/experts.py: each expert is a whole frozen network
    for name in trained:
        if lay.zero == 0:
            gpu[f"{name}_params"], gpu[f"{name}_grads"], gpu[f"{name}_optimizer"] = 4 * (p16 + p32), 4 * (p16 + p32), 8 * (p16 + p32)
            gpu[f"{name}_autocast_weights"] = compute * p16 if w.bf16 else 0
        elif lay.zero == 1:
            gpu[f"{name}_params"] = weights
            gpu[f"{name}_grads"] = 4 * (p16 + p32)
            opt = (4 * p16 if w.bf16 else 0) / n + 8 * (p16 + p32) / n
            (host if lay.optimizer_cpu_offload else gpu)[f"{name}_optimizer"] = opt
        else:
            target = host if lay.optimizer_cpu_offload else gpu
            target[f"{name}_params"] = 4 * sharded
            target[f"{name}_grads"] = 4 * sharded
            target[f"{name}_optimizer"] = 8 * sharded
    gpu["student_ema"] = 4 * _largest_ema_share(w.model, lay.tp, stage == 0, stage == lay.pp - 1, (first, last), n)
    if lay.zero == 3:  # one block gathered + the next prefetched (bf16), its fp32 gradient in backward;
        # the root unit (embeddings, time embedding, head) stays gathered between forward and backward
        blk = count({k: v for k, v in stage_shapes(w.model, lay.tp, False, False, (0, 1), w.bf16).items()
                     if k.startswith("blocks.")})
        root = count({k: v for k, v in shapes.items() if not k.startswith("blocks.")})
        gathered = compute * blk[1] + 4 * blk[0]
        gpu["fsdp_gather_buffers"] = 2 * gathered + 4 * sum(blk) + compute * root[1] + 4 * root[0]
        if lay.pp > 1:  # the 1F1B pass reduce-scatters at its last backward only: until then each unit
            gpu["fsdp_unsharded_grad_accumulation"] = 4 * (p16 + p32)  # of the stage holds its fp32 gradient
    return gpu, host


def fp8_weight(name: str, s, w: Workload) -> bool:
    """Whether --fp8-teacher quantizes this parameter: a block linear's weight whose sides are multiples of 16,
    in a block that --first-last-layers-bf16 does not keep (WanDiT.quantize_fp8)."""
    from ..kernels.fp8 import block_in_fp8, fp8_supported

    keep = (1, 1) if w.first_last_layers_bf16 else (0, 0)
    return name.startswith("blocks.") and name.endswith(".weight") and len(s.shape) == 2 and \
        fp8_supported(s.shape[1], s.shape[0]) and block_in_fp8(int(name.split(".")[1]), w.model.num_layers, *keep)


def _gathered_student(w: Workload, lay: Layout, stage: int) -> float:
    """Bytes of the whole student stage in its compute dtype (fp32-kept modules in fp32)."""
    p32, p16 = count(_stage_shapes(w, lay, stage)[1])
    return (2 if w.bf16 else 4) * p16 + 4 * p32


@functools.lru_cache(maxsize=256)
def _largest_ema_share(cfg, tp, pre, post, layer_range, n) -> int:
    """Elements of the largest of rcm.ema.partition_names' n shares (whole tensors)."""
    sizes = {k: v.numel for k, v in stage_shapes(cfg, tp, pre, post, layer_range).items()}
    return max(sum(sizes[k] for k in part) for part in partition_names(sizes, n))


def _rank_shape(w: Workload, lay: Layout) -> RankShape:
    return RankShape(lay.micro_batch_size, w.tokens, w.text_len, lay.tp, lay.cp, lay.sp,
                     2 if w.bf16 else 4, 4, fused_elementwise=lay.compiled_blocks)


def pass_memory(w: Workload, lay: Layout, stage: int = 0) -> dict[str, PassMemory]:
    """Activation memory of each kind of pass on one rank of ``stage``."""
    (first, last), _ = _stage_shapes(w, lay, stage)
    r = _rank_shape(w, lay)
    post = stage == lay.pp - 1
    in_flight = min(lay.pp - stage, lay.num_micro_batches) if lay.pp > 1 else 1
    grad = with_grad_pass(w.model, r, last - first, lay.recompute_num_layers, stage == 0, post)
    return {"forward": no_grad_pass(w.model, r, False, post),
            "tangent": no_grad_pass(w.model, r, True, post),
            "with_grad": PassMemory(grad.resident * in_flight, grad.transient)}


def plan_memory(w: Workload, lay: Layout, assume: MemoryAssumptions = MemoryAssumptions()) -> MemoryPlan:
    """The memory plan of the worst pipeline stage (the largest peak)."""
    plans = [_stage_plan(w, lay, s, assume) for s in sorted({0, lay.pp - 1})]
    return max(plans, key=lambda p: p.peak)


def _stage_plan(w: Workload, lay: Layout, stage: int, assume: MemoryAssumptions) -> MemoryPlan:
    gpu, host = model_states(w, lay, stage)
    passes = pass_memory(w, lay, stage)
    r = _rank_shape(w, lay)
    pipe_msgs = 2 * 2 * r.batch * r.act_bytes * r.stream * w.model.hidden_size if lay.pp > 1 else 0  # x, x_tan in/out
    plan = MemoryPlan(gpu, host, stage=stage)
    student_passes = {"with_grad": passes["with_grad"].peak}
    if w.mode == "distill":
        student_passes["forward"] = passes["forward"].peak
    if w.mode == "distill" and w.method in ("rcm", "scm"):
        student_passes["tangent"] = passes["tangent"].peak
    phases = {"student_step": student_passes}
    if w.uses_fake_score:
        phases["critic_step"] = {"forward": passes["forward"].peak, "with_grad": passes["with_grad"].peak}
    if lay.zero == 3 and w.mode == "distill":  # forward-only passes leave the student gathered (ranks roll out
        kept = _gathered_student(w, lay, stage)  # different step counts: fsdp_backend.LockstepNet)
        for peaks in phases.values():
            for kind in ("forward", "tangent"):
                if kind in peaks:
                    peaks[kind] += kept
    autocast = {k: v for k, v in gpu.items() if k.endswith("_autocast_weights")}
    base = {k: v for k, v in gpu.items() if not k.endswith("_autocast_weights")}
    for name, peaks in phases.items():
        which, act = max(peaks.items(), key=lambda kv: kv[1])
        items = dict(base)
        items.update(autocast)  # every trained model runs under autocast in both steps (rollouts, DMD)
        kept = lay.zero == 3 and w.mode == "distill" and which != "with_grad"
        items[f"activations ({which})" + (" + gathered student" if kept else "")] = act
        items["pipeline_messages"] = pipe_msgs
        items["collective_workspace"] = assume.collective_workspace_gib * GIB
        items["allocator_slack"] = assume.allocator_fraction * sum(items.values())
        items["cuda_context"] = assume.cuda_context_gib * GIB
        plan.phases[name] = items
    return plan
