"""Step time of an rCM iteration at a layout, from model FLOPs and per-pass efficiencies.

Compute: every pass's FLOPs (training/throughput.py) over the rank's share (TP x CP x PP of
the work), divided by the card's dense bf16 peak times the pass's efficiency. The default
efficiencies are the measured ones (docs/performance.md, Wan-1.3B, 32760 tokens, one H100):
tangent pass 2838 ms, with-grad pass with every block recomputed 3549 ms and without
recompute 563 ms for 6 blocks, a forward of 4 blocks 131 ms; TP 2 + SP scaled the tangent
pass 1.90x and the with-grad pass 1.87x; CP 4 all-to-all 3.87x / 3.75x, ring 3.52x / 2.72x;
the pipeline bubble followed (p - 1) / (m + p - 1). Scaling beyond the measured sizes repeats
the measured factor per doubling.

Estimates, not measured (marked in the plan): gradient reduction and ZeRO-3 parameter
gathers from link bandwidths, optimizer CPU offload from host Adam throughput and PCIe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..models.config import PRESETS
from ..training.throughput import mean_rollout_steps, wan_forward_flops
from .layout import Layout, Workload
from .params import count, stage_shapes

_MEASURED_CFG = PRESETS["wan-1.3b"]
_MEASURED_TOKENS = 32760


def _measured_efficiency(seconds: float, flops: float, peak_tflops: float = 989.4) -> float:
    return flops / seconds / (peak_tflops * 1e12)


def _f(layers: int):
    return wan_forward_flops(_MEASURED_CFG.replace(num_layers=layers), _MEASURED_TOKENS, 512)


@dataclass(frozen=True)
class TimeAssumptions:
    peak_tflops: float = 989.4  # H100 SXM / H200 dense bf16
    eff_forward: float = _measured_efficiency(0.131, _f(4).total)
    eff_tangent: float = _measured_efficiency(2.838, _f(30).tangent)
    eff_with_grad: float = _measured_efficiency(0.563, 3 * _f(6).total)
    eff_with_grad_recompute: float = _measured_efficiency(3.549, 3 * _f(30).total)
    tp_scaling: float = 0.94  # per doubling of TP with SP (1.90x tangent, 1.87x with grad at TP 2)
    cp_a2a_scaling: float = 0.98  # per doubling (CP 4: 0.97 tangent, 0.94 with grad)
    cp_p2p_scaling: float = 0.85  # per doubling, mean of tangent and with-grad (CP 4: 0.88, 0.68)
    intra_node_gbps: float = 150.0  # NCCL bus bandwidth per GPU inside a node (estimate)
    inter_node_gbps: float = 40.0  # per GPU across nodes (estimate: 400 Gb/s NIC per GPU)
    gpus_per_node: int = 8
    fsdp_overlap: float = 0.8  # share of ZeRO-3 gathers hidden under compute (estimate)
    host_adam_params_per_s: float = 0.38e9  # fp32 AdamW elements/s on the host (memory_slice.py, H100 host, 16 cores)
    pcie_gbps: float = 25.0  # host <-> GPU per GPU (estimate)


def _scaling(factor: float, size: int) -> float:
    return factor ** math.log2(size) if size > 1 else 1.0


def layout_efficiency(lay: Layout, a: TimeAssumptions) -> float:
    cp = a.cp_a2a_scaling if lay.cp_comm_type == "a2a" else a.cp_p2p_scaling
    return _scaling(a.tp_scaling, lay.tp) * _scaling(cp, lay.cp)


def pass_seconds(w: Workload, lay: Layout, a: TimeAssumptions = TimeAssumptions()) -> dict[str, float]:
    """Seconds of one pass over a DP rank's whole batch (all its micro-batches), by kind."""
    fw = wan_forward_flops(w.model, w.tokens, w.text_len)
    samples = lay.micro_batch_size * lay.num_micro_batches
    share = lay.tp * lay.cp * lay.pp
    rate = a.peak_tflops * 1e12 * layout_efficiency(lay, a)
    bubble = 1 + (lay.pp - 1) / lay.num_micro_batches if lay.pp > 1 else 1.0
    grad_eff = a.eff_with_grad_recompute if lay.recompute_num_layers else a.eff_with_grad
    flops = {"forward": fw.total, "tangent": fw.tangent, "with_grad": 3 * fw.total}
    eff = {"forward": a.eff_forward, "tangent": a.eff_tangent, "with_grad": grad_eff}
    return {k: samples * flops[k] / share / (rate * eff[k]) * bubble for k in flops}


def _link_gbps(lay: Layout, a: TimeAssumptions) -> float:
    """The DP x CP group's ranks are TP apart (megatron order tp-cp-dp-pp): inside one node when
    TP x DP x CP GPUs fit in it."""
    return a.intra_node_gbps if lay.tp * lay.shard_group <= a.gpus_per_node else a.inter_node_gbps


def step_seconds(w: Workload, lay: Layout, a: TimeAssumptions = TimeAssumptions()) -> dict[str, float]:
    """Seconds of a student step, a critic step and the mean iteration (one student step per
    ``student_update_freq`` iterations), with the estimated communication and offload parts."""
    t = pass_seconds(w, lay, a)
    n_roll = mean_rollout_steps(w.rollout_max_steps)
    student = t["with_grad"]
    if w.method in ("rcm", "scm"):
        student += 2 * t["forward"] + t["tangent"] + (t["with_grad"] if w.method == "rcm" else 0)
    if w.method in ("rcm", "dmd"):
        student += (n_roll + 1 + 2) * t["forward"]
    critic = n_roll * t["forward"] + t["with_grad"]
    shapes = stage_shapes(w.model, lay.tp, True, lay.pp == 1, (0, w.model.num_layers // lay.pp), w.bf16)
    params = sum(count(shapes))
    n = lay.shard_group
    bw = _link_gbps(lay, a) * 1e9
    ring = (n - 1) / n if n > 1 else 0.0
    # zero 1: fp32 gradient reduce-scatter + bf16 parameter all-gather once per step
    grad_sync = ring * params * (4 + 2) / bw
    gathers_student = gathers_critic = 0.0
    if lay.zero == 3:  # every pass gathers its model (with grad: again in backward, plus reduce-scatter)
        per_gather = ring * params * 2 / bw * (1 - a.fsdp_overlap)
        passes_student = (2 + 1 + 2) + (n_roll + 3 + 2) if w.method == "rcm" else 4
        gathers_student = passes_student * per_gather * lay.num_micro_batches
        gathers_critic = (n_roll + 2) * per_gather * lay.num_micro_batches
        grad_sync = ring * params * 4 / bw
    offload = 0.0
    if lay.optimizer_cpu_offload:
        shard = params / n
        offload = shard / a.host_adam_params_per_s + shard * (4 + 2) / (a.pcie_gbps * 1e9)
    student_total = student + gathers_student + grad_sync + offload
    critic_total = critic + gathers_critic + grad_sync + offload
    if w.method in ("rcm", "dmd"):
        mean = (student_total + (w.student_update_freq - 1) * critic_total) / w.student_update_freq
    else:
        mean = student_total
    return {"student_step": student_total, "critic_step": critic_total, "iteration": mean,
            "compute_student": student, "compute_critic": critic, "grad_sync_estimate": grad_sync,
            "fsdp_gather_estimate": gathers_student, "offload_estimate": offload}
