#!/usr/bin/env python
"""One GPU's proof of the memory plan: a rank-equivalent slice of the planned 8-GPU Wan-14B layout.

The layout is the one ``tools/plan_memory.py --model wan-14b --gpus 8 --gpu-memory-gib 80`` marks
best at 480p (today: TP 1, CP 1, DP 8, ZeRO-3 with optimizer CPU offload, full recompute). One
rank of it holds, on its GPU, 1/8 of the frozen teacher (bf16), 1/8 of the student's fp32 EMA and
(ZeRO-3) the gathered blocks it computes with; it runs every pass on whole-width blocks over one
sample's 32,760 (480p) or 75,600 (720p) tokens. So the slice is built on ONE GPU without process
groups: the planned per-rank state tensors allocated at the real parameter shapes' shard sizes
(``planning.params.fsdp_shard_numel`` of every parameter of the meta-built model), and a Wan-14B-
width model of ``--layers`` blocks in bf16 (the gathered copy the passes compute with), whose
gradients are dropped as they are made (FSDP2 reduce-scatters and frees them). Each pass of the
student and critic steps (no-grad forward, the tangent pass, the with-grad forward + backward
under the planned recompute) is measured: its own peak memory above what was resident and its
time, against the planner's prediction for the same model depth and shapes; the 40-layer figures
are the planner's 40-layer prediction scaled by the measured / planned ratio. The planner's time
model takes its rates from this same run (``measure_rates``: bf16 GEMMs at every per-rank block
shape, SDPA attention forward / backward over the tokens and over the text, the fused tangent
attention kernel, the bandwidth of a norm-modulate-GELU chain), each entering only through the
passes' FLOP and byte counts; ``time_error_default_rates`` is the planner's default (H100) rates. The optimizer step
of a ZeRO-3 shard is timed on the GPU (offload off) and on the host with the PCIe copies
(offload on: the planner's offload estimate).

Not measured here (estimates in the plan, docs/memory_plan.md): collective time (ZeRO-3 gathers,
gradient reduce-scatter) and the gather / prefetch buffers of FSDP2.

    python benchmarks/memory_slice.py --out benchmarks/results          # one H100 / H200, ~5-6 min
    python benchmarks/memory_slice.py --tiny                            # CPU, the tiny model, seconds
    python benchmarks/memory_slice.py --replan results/memory_slice_X.json --out results  # no GPU

Writes ``memory_slice_<date>_<card>.json`` (card, date, command, every figure with its relative
error under a key containing ``error``) and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {"480p": (16, 21, 60, 104), "720p": (16, 21, 90, 160)}  # 32,760 and 75,600 tokens
TINY_SHAPES = {"tiny": (16, 4, 8, 8)}


def card_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def rel_error(measured: float, planned: float) -> float:
    return (planned - measured) / measured if measured else float("nan")


def planned_layout(cfg, latent, gpus: int, gib: float):
    from rcm_megatron.planning import Workload, fitting_layouts

    w = Workload(cfg, latent, bf16=True, global_batch_size=64)  # tools/plan_memory.py's default (the recipe's)
    fits = fitting_layouts(w, gpus, gib)
    if not fits:
        raise SystemExit(f"memory_slice.py: no layout of {gpus} x {gib} GiB fits {latent}")
    return fits[0].layout


class Meter:
    """Peak bytes a pass adds to what is resident, and its seconds (CUDA allocator, or on CPU the
    live-tensor tracker ``planning.measure.LiveTensorPeak``)."""

    def __init__(self, device, model):
        self.device, self.model = device, model

    def run(self, fn):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base, time.perf_counter() - t0
        from rcm_megatron.planning.measure import LiveTensorPeak, fused_attention_outputs_only

        tracker = LiveTensorPeak.for_model(self.model)
        t0 = time.perf_counter()
        with tracker, fused_attention_outputs_only(tracker):
            fn()
        return tracker.peak, time.perf_counter() - t0


def allocate_states(cfg, lay, device, bf16: bool):
    """The planned GPU states of one rank (ZeRO-3 shards at the real parameter shapes)."""
    import torch

    from rcm_megatron.models import WanDiT
    from rcm_megatron.planning.params import fsdp_shard_numel

    with torch.device("meta"):
        full = WanDiT(cfg).to_dtype(torch.bfloat16 if bf16 else torch.float32)
    n = lay.dp * lay.cp
    held = []
    for _, p in full.named_parameters():
        k = fsdp_shard_numel(tuple(p.shape), n)
        held.append(torch.empty(k, dtype=p.dtype, device=device))  # teacher shard (bf16; fp32-kept modules fp32)
        held.append(torch.empty(k, dtype=torch.float32, device=device))  # student EMA shard
        if not lay.optimizer_cpu_offload:  # student and fake score: fp32 params, grads, 2 moments
            held.append(torch.empty(8 * k, dtype=torch.float32, device=device))
    return held


def time_optimizer(numel: int, device, on_host: bool) -> float:
    """Seconds of one AdamW step over ``numel`` fp32 elements on the GPU, or on the host plus the
    PCIe copies offload makes (fp32 gradients down, bf16 parameters up)."""
    import torch

    where = torch.device("cpu") if on_host else device
    p = torch.zeros(numel, device=where, requires_grad=True)
    p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, foreach=True)
    opt.step()
    grad_dev = torch.zeros(numel, device=device) if on_host else None
    up = torch.zeros(numel, dtype=torch.bfloat16, device=device) if on_host else None
    pin = device.type == "cuda"
    host_grad = torch.empty(numel, pin_memory=pin) if on_host else None
    host_bf16 = torch.empty(numel, dtype=torch.bfloat16, pin_memory=pin) if on_host else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if on_host:
        host_grad.copy_(grad_dev)
        p.grad.copy_(host_grad)
    opt.step()
    if on_host:
        host_bf16.copy_(p.detach())
        up.copy_(host_bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _seconds(fn, device, reps: int = 5) -> float:
    """Mean seconds of fn() after a warm-up call (synchronized on CUDA)."""
    import torch

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def measure_rates(cfg, lay, tokens: int, text_len: int, device, dtype):
    """The planner's ``KernelRates``, measured here at this layout's per-rank shapes: every block
    GEMM shape, attention forward / backward (SDPA: cuDNN or flash), the fused tangent kernel,
    cross-attention over the text, and the bandwidth of a norm-modulate-GELU chain whose bytes are
    counted as the planner counts them (``planning.elementwise.bytes_moved``). Not circular: the
    passes are timed separately, and the rates enter the plan only through their FLOP/byte counts."""
    import torch
    import torch.nn.functional as F

    from rcm_megatron.kernels import attention_with_tangent
    from rcm_megatron.planning import Workload
    from rcm_megatron.planning.elementwise import bytes_moved
    from rcm_megatron.planning.step_time import KernelRates, block_gemms

    w = Workload(cfg, (cfg.in_channels, 1, 2, 2), text_len=text_len)  # shapes only: rows set below
    s = tokens // lay.cp
    table = {}
    for m, k, n in block_gemms(w, lay):
        if (k, n) in table or m != w.tokens / lay.cp:
            continue
        a = torch.randn(s, k, device=device, dtype=dtype)
        b = torch.randn(n, k, device=device, dtype=dtype)
        table[(k, n)] = 2 * s * k * n / _seconds(lambda: F.linear(a, b), device) / 1e12
        del a, b
    heads, hd = cfg.num_attention_heads // lay.tp, cfg.head_dim

    def attn_rates(lk):
        q = torch.randn(1, heads, s, hd, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, heads, lk, hd, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(1, heads, lk, hd, device=device, dtype=dtype, requires_grad=True)
        flops = 4 * s * lk * heads * hd
        fwd = _seconds(lambda: F.scaled_dot_product_attention(q, k, v), device)
        o = F.scaled_dot_product_attention(q, k, v)
        g = torch.randn_like(o)
        bwd = _seconds(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True), device)
        return flops / fwd / 1e12, 2 * flops / bwd / 1e12

    self_fwd, self_bwd = attn_rates(tokens)  # keys: every token (CP gathers or rings them)
    cross_fwd, cross_bwd = attn_rates(text_len)
    q, k, v, q_tan, k_tan, v_tan = (torch.randn(1, s, heads, hd, device=device, dtype=dtype) for _ in range(6))
    with torch.no_grad():
        tan = 3 * 4 * s * tokens * heads * hd / _seconds(lambda: attention_with_tangent(q, k, v, q_tan, k_tan, v_tan),
                                                          device) / 1e12
    del q, k, v, q_tan, k_tan, v_tan
    x = torch.randn(s, cfg.hidden_size, device=device, dtype=dtype)
    shift, scale = (torch.randn(cfg.hidden_size, device=device, dtype=torch.float32) for _ in range(2))

    def chain():  # a norm, a modulation and a GELU, in fp32 as the blocks compute them
        h = F.layer_norm(x.float(), (cfg.hidden_size,)) * (1 + scale) + shift
        return F.gelu(h, approximate="tanh").to(dtype) + x

    gbps = bytes_moved(chain) / _seconds(chain, device) / 1e9
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return KernelRates(gemm_table=tuple((k, n, r) for (k, n), r in table.items()), attn_fwd_tflops=self_fwd,
                       attn_bwd_tflops=self_bwd, attn_tangent_tflops=tan, cross_attn_fwd_tflops=cross_fwd,
                       cross_attn_bwd_tflops=cross_bwd, elementwise_gbps=gbps, source="measured in this run")


_MODELS = {}


def _slice_model(cfg, device, bf16: bool):
    """The slice's blocks (built once, on the host: the model draws its weights from CPU generators)."""
    import torch

    from rcm_megatron.models import WanDiT

    if cfg not in _MODELS:
        model = WanDiT(cfg).to(device)
        if bf16:
            model.to_dtype(torch.bfloat16)
        for p in model.parameters():  # gradients are reduce-scattered and freed as they are made
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        _MODELS[cfg] = model
    return _MODELS[cfg]


def run_shape(name, latent, cfg_full, layers, device, lay, reps, rates):
    import torch

    from rcm_megatron.models.recompute import RecomputeConfig
    from rcm_megatron.planning import Workload
    from rcm_megatron.planning.memory import pass_memory
    from rcm_megatron.planning.step_time import TimeAssumptions, pass_seconds

    cfg = cfg_full.replace(num_layers=layers)
    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = _slice_model(cfg, device, bf16)
    model.set_activation_recompute(RecomputeConfig("full", max(1, lay.recompute_num_layers)) if
                                   lay.recompute_num_layers else RecomputeConfig())
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, *latent, generator=g).to(device, dtype)
    tx = torch.randn(1, *latent, generator=g).to(device, dtype)
    t = torch.full((1,), 500.0, device=device)
    ctx = torch.randn(1, 512, cfg.text_dim, generator=g).to(device, dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def forward():
        with torch.no_grad(), autocast:
            model(x, t, ctx)

    def tangent():
        with autocast:
            model.forward_with_tangent(x, t, ctx, tx, torch.ones_like(t))

    def with_grad():
        with autocast:
            y = model(x, t, ctx)
        y.float().square().mean().backward()

    meter = Meter(device, model)
    lay1 = dataclasses.replace(lay, num_micro_batches=1, micro_batch_size=1)
    w_k = Workload(cfg, latent, bf16=bf16, global_batch_size=lay.dp)
    w_40 = Workload(cfg_full, latent, bf16=bf16, global_batch_size=lay.dp)
    plan_mem_k, plan_mem_40 = pass_memory(w_k, lay1), pass_memory(w_40, lay1)
    measured_rates = TimeAssumptions(rates=rates)
    plan_s_k, plan_s_40 = pass_seconds(w_k, lay1, measured_rates), pass_seconds(w_40, lay1, measured_rates)
    default_s_k = pass_seconds(w_k, lay1)  # the planner's default (H100) rates, for comparison
    rows = {}
    for kind, fn in (("forward", forward), ("tangent", tangent), ("with_grad", with_grad)):
        fn()  # warm-up (kernels, autotuning, allocator)
        runs = [meter.run(fn) for _ in range(reps)]
        peak, secs = max(r[0] for r in runs), min(r[1] for r in runs)
        planned_peak, planned_s = plan_mem_k[kind].peak, plan_s_k[kind]
        rows[kind] = {
            "tokens": w_k.tokens, "layers": layers, "measured_peak_gib": peak / 2**30,
            "planned_peak_gib": planned_peak / 2**30, "peak_error": rel_error(peak, planned_peak),
            "measured_s": secs, "planned_s": planned_s, "time_error": rel_error(secs, planned_s),
            "planned_s_default_rates": default_s_k[kind],
            "time_error_default_rates": rel_error(secs, default_s_k[kind]),
            "planned_peak_gib_40_layers": plan_mem_40[kind].peak / 2**30,
            "extrapolated_peak_gib_40_layers": plan_mem_40[kind].peak / max(planned_peak, 1) * peak / 2**30,
            "planned_s_40_layers": plan_s_40[kind],
            "extrapolated_s_40_layers": plan_s_40[kind] / max(planned_s, 1e-12) * secs}
    return {name: rows}


def replan(path: str, out: str | None) -> int:
    """Recompute the planned pass times of an earlier slice JSON with today's planner and its default
    rates (that run measured no rates), next to the measured times: no GPU needed."""
    from rcm_megatron.models import preset
    from rcm_megatron.planning import Layout, Workload
    from rcm_megatron.planning.step_time import KernelRates, pass_seconds

    with open(path) as f:
        old = json.load(f)
    lay = Layout(dp=old["dp"], zero=3, recompute_num_layers=1 if "--recompute-num-layers" in old["layout"] else 0,
                 optimizer_cpu_offload="--optimizer-cpu-offload" in old["layout"])
    cfg = preset(old["model"])
    result = {"card": old["card"], "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "measured_on": old["date"], "measured_command": old["command"],
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "rates": dataclasses.asdict(KernelRates()), "passes": {}}
    for shape, rows in old["passes"].items():
        latent = (SHAPES | TINY_SHAPES)[shape]
        result["passes"][shape] = {}
        for kind, r in rows.items():
            w = Workload(cfg.replace(num_layers=r["layers"]), latent, bf16=old["model"] != "tiny",
                         global_batch_size=lay.dp)
            planned = pass_seconds(w, lay)[kind]
            result["passes"][shape][kind] = {
                "measured_s": r["measured_s"], "planned_s_before": r["planned_s"], "time_error_before": r["time_error"],
                "planned_s": planned, "time_error": rel_error(r["measured_s"], planned)}
            print(f"{shape:6} {kind:10} measured {r['measured_s']:7.3f} s  before {r['planned_s']:7.3f} s "
                  f"({r['time_error']:+.1%})  now {planned:7.3f} s ({rel_error(r['measured_s'], planned):+.1%})")
    if out:
        target = os.path.join(out, os.path.basename(path).replace(".json", "_replanned.json"))
        with open(target, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {target}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, the tiny preset, a small latent (the test path)")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the slice (the rest extrapolated per layer)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--adam-fraction", type=float, default=0.125,
                    help="share of one model's ZeRO-3 shard the optimizer timing steps (scaled up)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default: none written)")
    ap.add_argument("--replan", default=None, metavar="JSON",
                    help="no run: an earlier slice JSON's measured pass times against today's planner (default rates)")
    args = ap.parse_args(argv)
    if args.replan:
        return replan(args.replan, args.out)
    import torch

    from rcm_megatron.models import WanDiT, preset
    from rcm_megatron.planning import Workload
    from rcm_megatron.planning.memory import model_states
    from rcm_megatron.planning.step_time import step_seconds

    if args.tiny:
        cfg, shapes, device, gpus, gib = preset("tiny"), TINY_SHAPES, torch.device("cpu"), 2, 1.0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("memory_slice.py: needs a CUDA GPU (or --tiny for the CPU path)")
        cfg, shapes, device, gpus, gib = preset("wan-14b"), SHAPES, torch.device("cuda"), 8, 80.0
    first = next(iter(shapes.values()))
    lay = planned_layout(cfg, first, gpus, gib) if not args.tiny else \
        __import__("rcm_megatron.planning", fromlist=["Layout"]).Layout(dp=gpus, zero=3, recompute_num_layers=1,
                                                                          optimizer_cpu_offload=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"card": card, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
              "layout": lay.flags(), "dp": lay.dp, "model": "tiny" if args.tiny else "wan-14b", "passes": {}}

    # model states: the planned per-rank GPU states, allocated at the real shapes' shard sizes
    w = Workload(cfg, first, bf16=device.type == "cuda", global_batch_size=lay.dp)
    gpu_plan, host_plan = model_states(w, lay)
    planned_states = sum(v for k, v in gpu_plan.items() if k != "fsdp_gather_buffers")
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    held = allocate_states(cfg, lay, device, bf16=device.type == "cuda")
    measured_states = (torch.cuda.memory_allocated() - before) if device.type == "cuda" else \
        sum(t.numel() * t.element_size() for t in held)
    result["states"] = {"measured_gib": measured_states / 2**30, "planned_gib": planned_states / 2**30,
                        "states_error": rel_error(measured_states, planned_states),
                        "gather_buffers_gib_estimate": gpu_plan.get("fsdp_gather_buffers", 0) / 2**30,
                        "host_gib": sum(host_plan.values()) / 2**30}

    from rcm_megatron.training.throughput import num_tokens

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["rates"] = {}
    for name, latent in shapes.items():
        rates = measure_rates(cfg, lay, num_tokens(cfg, latent), 512, device, dtype)
        result["rates"][name] = dataclasses.asdict(rates)
        result["passes"].update(run_shape(name, latent, cfg, args.layers, device, lay, args.reps, rates))

    # optimizer step of one model's ZeRO-3 shard: GPU (offload off) vs host + PCIe (offload on)
    with torch.device("meta"):
        numel = sum(p.numel() for p in WanDiT(cfg).parameters())
    shard = numel // (lay.dp * lay.cp)
    part = max(1, int(shard * args.adam_fraction))
    scale = shard / part
    gpu_s = time_optimizer(part, device, on_host=False) * scale
    host_s = time_optimizer(part, device, on_host=True) * scale
    planned = step_seconds(w, lay)["offload_estimate"] if lay.optimizer_cpu_offload else float("nan")
    result["optimizer_step"] = {"shard_params": shard, "gpu_s": gpu_s, "offload_s": host_s,
                                "planned_offload_s": planned, "offload_error": rel_error(host_s, planned)}
    del held

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
        path = os.path.join(args.out, f"memory_slice_{day}_{card_slug(card)}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    print(f"{result['model']} slice of {lay.flags()} (DP {lay.dp}) on {card}")
    s = result["states"]
    print(f"states: measured {s['measured_gib']:.2f} GiB, planned {s['planned_gib']:.2f} GiB "
          f"(error {s['states_error']:+.1%}); gather buffers {s['gather_buffers_gib_estimate']:.2f} GiB (estimate)")
    o = result["optimizer_step"]
    print(f"optimizer step of a {o['shard_params'] / 1e9:.3f}B shard: GPU {o['gpu_s']:.2f} s, offloaded "
          f"{o['offload_s']:.2f} s, planned offload {o['planned_offload_s']:.2f} s (error {o['offload_error']:+.1%})")
    for shape, r in result["rates"].items():
        gemms = ", ".join(f"{k}x{n} {t:.0f}" for k, n, t in r["gemm_table"])
        print(f"rates {shape} (TFLOP/s; GB/s): GEMM {gemms}; attention fwd {r['attn_fwd_tflops']:.0f} bwd "
              f"{r['attn_bwd_tflops']:.0f} tangent {r['attn_tangent_tflops']:.0f} cross {r['cross_attn_fwd_tflops']:.0f}"
              f"/{r['cross_attn_bwd_tflops']:.0f}; elementwise {r['elementwise_gbps']:.0f}")
    print(f"{'shape':6} {'pass':10} {'layers':>6} {'peak GiB':>9} {'plan GiB':>9} {'error':>7} {'time s':>8} "
          f"{'plan s':>8} {'error':>7} {'40L GiB':>8} {'40L s':>8}")
    for shape, rows in result["passes"].items():
        for kind, r in rows.items():
            print(f"{shape:6} {kind:10} {r['layers']:6d} {r['measured_peak_gib']:9.3f} {r['planned_peak_gib']:9.3f} "
                  f"{r['peak_error']:+7.1%} {r['measured_s']:8.3f} {r['planned_s']:8.3f} {r['time_error']:+7.1%} "
                  f"{r['extrapolated_peak_gib_40_layers']:8.2f} {r['extrapolated_s_40_layers']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
