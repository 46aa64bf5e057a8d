"""Step time of an rCM iteration at a layout: compute from the kinds of work and their measured rates.

A pass's compute time on one rank is the sum of three kinds of work, each at its own rate:

- GEMMs: the per-rank linear shapes of every block (q/k/v/o and cross q/o ``(D, D/tp)``, FFN
  ``(D, F/tp)`` / ``(F/tp, D)``, cross k/v over the text) with ``S/cp`` rows, each at the rate of
  its shape (``KernelRates.gemm_rate``: a measured table, else ``1/r = 1/r_inf + c (1/k + 1/n)``
  fitted to measured shapes: narrow GEMMs run slower, which is why Wan-1.3B's per-pass
  efficiencies over-predicted Wan-14B). Backward GEMMs at the forward shapes' rates.
- attention: its own FLOPs (training/throughput.py) at a separate rate for the forward, the
  backward, the fused tangent kernel and cross-attention (short keys run slower).
- memory-bound ops (norms, modulation, RoPE, GELU, casts): bytes moved (``planning.elementwise``,
  counted from the model on the meta device) over the achieved bandwidth; compiled blocks move a
  measured share of the eager bytes.

Passes: forward = 1 unit of each; tangent = 2x token GEMMs (primal and tangent), the tangent
attention kernel, its bytes; with grad = forward + backward (2x GEMMs, attention backward), plus
one more forward under full recompute. Per-rank shares: tokens / CP, widths / TP (sequence-
parallel elementwise work / TP), blocks / PP. TP and CP communication keep the measured
per-doubling factors (``tp_scaling``, ``cp_*_scaling``: TP 2 + SP scaled the passes 1.87-1.90x,
CP 4 all-to-all 3.75-3.87x, ring 2.72-3.52x), the pipeline bubble (p - 1) / m.

Default rates (``KernelRates()``): GEMM and attention rates measured on one H100 in one run
(benchmarks/rcm_step.py, Wan-1.3B shapes, results/rcm_step_20261206T043933Z); the eager
elementwise bandwidth is an assumption (about 70% of the H100's 3.35 TB/s), the compiled share
fitted to that run. ``benchmarks/memory_slice.py`` measures every rate at the planned per-rank
shapes in the same run as the passes it compares against and passes them in.

Estimates, not measured (marked in the plan): gradient reduction and ZeRO-3 parameter
gathers from link bandwidths, optimizer CPU offload from host Adam throughput and PCIe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..training.throughput import mean_rollout_steps, wan_forward_flops
from .elementwise import elementwise_bytes
from .layout import Layout, Workload
from .params import count, stage_shapes


@dataclass(frozen=True)
class KernelRates:
    """Achieved rates of each kind of work on one GPU: TFLOP/s for GEMMs and attention, GB/s for
    memory-bound ops. ``gemm_table``: measured rates by (k, n) of a GEMM [m, k] x [k, n]."""

    gemm_r_inf_tflops: float = 843.5  # fit of 1/r = 1/r_inf + c (1/k + 1/n) to the H100 run's shapes
    gemm_width_c: float = 0.1095  # (1536x1536 753, 1536x8960 788, 8960x1536 816 TFLOP/s)
    gemm_table: tuple = ()  # ((k, n, tflops), ...)
    attn_fwd_tflops: float = 573.0  # cuDNN self-attention 32,760 x 32,760, 12 heads x 128
    attn_bwd_tflops: float = 427.6  # its backward (2x the forward FLOPs)
    attn_tangent_tflops: float = 573.0  # fused tangent kernel per forward-attention unit (3 per call)
    cross_attn_fwd_tflops: float = 536.5  # keys: 512 text tokens
    cross_attn_bwd_tflops: float = 152.6
    elementwise_gbps: float = 2400.0  # eager memory-bound kernels (assumed: ~70% of 3.35 TB/s)
    compiled_elementwise_share: float = 0.16  # bytes left after --compile-blocks (fit, Wan-1.3B run)
    source: str = "H100 defaults (rcm_step 1.3B shapes; elementwise assumed)"

    def gemm_rate(self, k: int, n: int) -> float:
        for tk, tn, r in self.gemm_table:
            if (tk, tn) == (k, n):
                return r
        return 1.0 / (1.0 / self.gemm_r_inf_tflops + self.gemm_width_c * (1.0 / k + 1.0 / n))


@dataclass(frozen=True)
class TimeAssumptions:
    rates: KernelRates = field(default_factory=KernelRates)
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


def block_gemms(w: Workload, lay: Layout) -> list[tuple[float, int, int]]:
    """(m, k, n) of one block's linears on one rank: token rows S / cp, widths / tp."""
    c = w.model
    d, f, tp = c.hidden_size, c.ffn_hidden_size, lay.tp
    s, text = w.tokens / lay.cp, w.text_len
    return [(s, d, d // tp)] * 3 + [(s, d // tp, d)] + [(s, d, d // tp), (s, d // tp, d)] \
        + [(text, d, d // tp)] * 2 + [(s, d, f // tp), (s, f // tp, d)]


def work_seconds(w: Workload, lay: Layout, r: KernelRates) -> dict[str, dict[str, float]]:
    """One sample's seconds on one rank by pass ('forward', 'tangent', 'with_grad') and kind of work
    ('gemm', 'attention', 'elementwise'), without communication factors or bubble."""
    c = w.model
    layers = c.num_layers / lay.pp
    fw = wan_forward_flops(c, w.tokens, w.text_len)
    per_block = sum(2 * m * k * n / (r.gemm_rate(k, n) * 1e12) for m, k, n in block_gemms(w, lay))
    token_block = sum(2 * m * k * n / (r.gemm_rate(k, n) * 1e12) for m, k, n in block_gemms(w, lay) if m != w.text_len)
    outside = (fw.token_linear + fw.text_linear + fw.time_linear
               - c.num_layers * (12 * w.tokens * c.hidden_size ** 2 + 4 * w.tokens * c.hidden_size * c.ffn_hidden_size
                                 + 4 * w.text_len * c.hidden_size ** 2)) / (lay.tp * lay.cp * lay.pp)
    gemm = layers * per_block + outside / (r.gemm_rate(c.hidden_size, c.hidden_size) * 1e12)
    gemm_tan = gemm + layers * token_block + outside / (r.gemm_rate(c.hidden_size, c.hidden_size) * 1e12)
    share = lay.tp * lay.cp * lay.pp
    sa, ca = fw.self_attention / share, fw.cross_attention / share
    attn_fwd = sa / (r.attn_fwd_tflops * 1e12) + ca / (r.cross_attn_fwd_tflops * 1e12)
    attn_bwd = 2 * sa / (r.attn_bwd_tflops * 1e12) + 2 * ca / (r.cross_attn_bwd_tflops * 1e12)
    attn_tan = 3 * sa / (r.attn_tangent_tflops * 1e12) + 2 * ca / (r.cross_attn_fwd_tflops * 1e12)
    dtype = "bf16" if w.bf16 else "fp32"
    bw = r.elementwise_gbps * 1e9 / (r.compiled_elementwise_share if lay.compiled_blocks else 1.0)

    def moved(kind):
        import torch

        b = elementwise_bytes(c, w.tokens / lay.cp, w.text_len, kind,
                              torch.bfloat16 if dtype == "bf16" else torch.float32, layers=round(layers))
        return b / lay.tp / bw

    out = {"forward": {"gemm": gemm, "attention": attn_fwd, "elementwise": moved("forward")},
           "tangent": {"gemm": gemm_tan, "attention": attn_tan, "elementwise": moved("tangent")},
           "with_grad": {"gemm": 3 * gemm, "attention": attn_fwd + attn_bwd, "elementwise": moved("with_grad")}}
    if lay.recompute_num_layers:  # full recompute: every block's forward runs again in the backward
        out["with_grad"] = {k: v + out["forward"][k] for k, v in out["with_grad"].items()}
    return out


def pass_seconds(w: Workload, lay: Layout, a: TimeAssumptions = TimeAssumptions()) -> dict[str, float]:
    """Seconds of one pass over a DP rank's whole batch (all its micro-batches), by kind."""
    samples = lay.micro_batch_size * lay.num_micro_batches
    bubble = 1 + (lay.pp - 1) / lay.num_micro_batches if lay.pp > 1 else 1.0
    eff = layout_efficiency(lay, a)
    return {k: samples * sum(parts.values()) / eff * bubble for k, parts in work_seconds(w, lay, a.rates).items()}


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
