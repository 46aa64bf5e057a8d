#!/usr/bin/env python
"""A whole rCM iteration on one GPU, pass by pass, against ceilings measured in the same run.

Runs ``pretrain_rcm.main`` in this process (the trainer's own student and critic steps) at
Wan-1.3B 480p (latents 16 x 21 x 60 x 104 = 32,760 tokens, text 512, bf16, random weights,
synthetic data, full activation recompute unless ``--recompute-num-layers 0``) and times every
named training pass (``kernels.dispatch.training_pass``: teacher CFG, student tangent, with-grad
forwards and their backwards, rollouts, fake score) with CUDA events. Network calls per pass are
counted with a module forward hook, so each pass's model FLOPs are exact (rollout lengths are
random). Schedule: ``--tangent-warmup-iters 1`` makes iteration 1 an sCM-only student step that warms
every kernel of the student path, then critic steps 2-5, an rCM student step at 6 (F = 5) and a
critic step at 7: iterations 3-7 are one schedule period (one student step and F-1 critic steps)
after every pass has run once (compiled blocks compile on first use).

Ceilings: bf16 GEMM rates at the model's token-linear shapes and cuDNN attention forward and
backward rates (self-attention 32,760 x 32,760, cross-attention 32,760 x 512), all measured here;
a pass's ceiling is its model FLOPs of each kind at those rates (tangent pass: 2x the token GEMMs,
3 attention-forward units for self-attention, 2 for cross-attention). ``fraction`` = ceiling /
measured time.

Writes ``rcm_step_<date>_<card>.json`` (card, date, command, versions; the schedule-period average
under ``period_model_tflops_per_gpu``, the trainer's FLOP counting) and prints a table last.

    python benchmarks/rcm_step.py --out benchmarks/results [--label baseline] [-- extra pretrain flags]

A/B of the trainer's switches goes through the extra flags, e.g. ``-- --no-fused-tangent-ops`` (the PyTorch ops instead of
the fused Triton elementwise kernels in the no-grad passes of eager blocks), ``-- --compile-blocks on``, ``-- --fp8-teacher``; the JSON
records the label and the switches (``fused_tangent_ops``, ``compile_blocks``, ``fp8_teacher``).

With ``--fp8-teacher`` the teacher passes are FP8 work: they are reported apart (``fp8_teacher_passes``: time, model
TFLOP/s and MFU against the FP8 peak, 2x the bf16 one on H100/H200), their ceiling uses FP8 GEMM rates measured
here (``torch._scaled_mm``, row-wise scales), and ``period_bf16_model_tflops_per_gpu`` counts the other passes'
FLOPs over the period's time outside the teacher passes (against the bf16 peak: ``period_bf16_mfu``).
``period_model_tflops_per_gpu`` stays the trainer's counting of every pass.

    python benchmarks/rcm_step.py --tiny --out /tmp/rcm_step -- --fp8-teacher   # CPU: the tiny model, no ceilings
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as pretrain_rcm.py sets it
sys.path.insert(0, ROOT)

S, L, HEADS, HEAD_DIM, D, FFN = 32760, 512, 12, 128, 1536, 8960
MICRO_BATCH = 2  # pretrain_rcm.py's default micro-batch off the toy task
SCHEDULE = ["--train-iters", "7", "--student-update-freq", "5", "--tangent-warmup-iters", "1", "--log-interval", "1"]
FLAGS = ["--model", "wan-1.3b", "--bf16", "--micro-batch-size", str(MICRO_BATCH), "--data", "synthetic",
         "--latent-shape", "16", "21", "60", "104", *SCHEDULE]
TINY_LATENT, TINY_TEXT_LEN = (16, 2, 4, 4), 8  # --tiny: 8 tokens of the tiny model; SyntheticLatents' text length
TINY_FLAGS = ["--model", "tiny", "--device", "cpu", "--micro-batch-size", str(MICRO_BATCH), "--data", "synthetic",
              "--latent-shape", *map(str, TINY_LATENT), *SCHEDULE]
FP8_PEAK_FACTOR = 2  # dense FP8 peak / dense bf16 peak on H100 and H200


def card_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def timed(fn, reps: int = 10) -> float:
    """Mean milliseconds of fn() after warm-up (CUDA events)."""
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def ceiling_rates(fp8: bool = False) -> dict:
    """TFLOP/s of bf16 GEMMs at the token-linear shapes and of cuDNN attention forward/backward;
    with ``fp8`` also of FP8 GEMMs (the bare ``_scaled_mm`` and with the activation's quantization)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, bf = "cuda", torch.bfloat16
    rates = {}
    gemm_flops = gemm_ms = 0.0
    for k, n, count in ((D, D, 6), (D, FFN, 1), (FFN, D, 1)):  # q,k,v,o,cross q,o; fc1; fc2 per block
        a, w = torch.randn(S, k, device=dev, dtype=bf), torch.randn(n, k, device=dev, dtype=bf)
        ms = timed(lambda: F.linear(a, w))
        rates[f"gemm_{S}x{k}x{n}"] = 2 * S * k * n / ms / 1e9
        gemm_flops += count * 2 * S * k * n
        gemm_ms += count * ms
    rates["gemm_token_linear"] = gemm_flops / gemm_ms / 1e9  # per-block mix of the shapes
    if fp8:  # the FP8 teacher's GEMMs: torch._scaled_mm with row-wise scales (kernels/fp8.py), bf16 out
        from rcm_megatron.kernels.fp8 import fp8_linear, quantize_rows

        gemm_ms = 0.0
        for k, n, count in ((D, D, 6), (D, FFN, 1), (FFN, D, 1)):
            a = torch.randn(S, k, device=dev, dtype=bf)
            aq, a_s = quantize_rows(a)
            wq, ws = quantize_rows(torch.randn(n, k, device=dev, dtype=bf))
            ms = timed(lambda: torch._scaled_mm(aq, wq.t(), scale_a=a_s, scale_b=ws.t(), out_dtype=bf))
            rates[f"fp8_gemm_{S}x{k}x{n}"] = 2 * S * k * n / ms / 1e9
            rates[f"fp8_linear_{S}x{k}x{n}"] = 2 * S * k * n / timed(lambda: fp8_linear(a, wq, ws)) / 1e9
            gemm_ms += count * ms
        rates["fp8_gemm_token_linear"] = gemm_flops / gemm_ms / 1e9
    for name, lk in (("self", S), ("cross", L)):
        q = torch.randn(1, HEADS, S, HEAD_DIM, device=dev, dtype=bf, requires_grad=True)
        k = torch.randn(1, HEADS, lk, HEAD_DIM, device=dev, dtype=bf, requires_grad=True)
        v = torch.randn(1, HEADS, lk, HEAD_DIM, device=dev, dtype=bf, requires_grad=True)
        flops = 4 * S * lk * HEADS * HEAD_DIM
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            o = F.scaled_dot_product_attention(q, k, v)
            g = torch.randn_like(o)
            bwd = timed(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True))
        rates[f"attn_{name}_fwd"] = flops / fwd / 1e9
        rates[f"attn_{name}_bwd"] = 2 * flops / bwd / 1e9
        del q, k, v, o, g
    torch.cuda.empty_cache()
    return rates


def path_switches(extra: list[str]) -> dict:
    """The A/B switches of the trainer path this run took, from its extra pretrain flags (last wins)."""
    compile_blocks, fused = "auto", True
    for i, flag in enumerate(extra):
        if flag in ("--fused-tangent-ops", "--no-fused-tangent-ops"):
            fused = flag == "--fused-tangent-ops"
        elif flag == "--compile-blocks" and i + 1 < len(extra):
            compile_blocks = extra[i + 1]
        elif flag.startswith("--compile-blocks="):
            compile_blocks = flag.split("=", 1)[1]
    return {"fused_tangent_ops": fused, "compile_blocks": compile_blocks,
            "fp8_teacher": "--fp8-teacher" in extra}


def pass_kind(name: str) -> str:
    if "backward" in name:
        return "backward"
    if "tangent" in name:
        return "tangent"
    return "forward"


def is_fp8_pass(name: str, fp8_teacher: bool) -> bool:
    """The passes that run the FP8 teacher's GEMMs under --fp8-teacher."""
    return fp8_teacher and name.startswith("teacher")


def ceiling_ms(fw, kind: str, calls: int, rates: dict | None, fp8: bool = False) -> float | None:
    """Milliseconds of a pass's model FLOPs at the measured rates (fw: ForwardFlops of one call);
    ``fp8``: the token linears at the FP8 GEMM rate. None without rates (the CPU path)."""
    if rates is None:
        return None
    g, sf, cf = rates["gemm_token_linear"], rates["attn_self_fwd"], rates["attn_cross_fwd"]
    if fp8:
        t = fw.token_linear / rates["fp8_gemm_token_linear"] + (fw.text_linear + fw.time_linear) / g \
            + fw.self_attention / sf + fw.cross_attention / cf
        return calls * t / 1e9
    lin = fw.token_linear + fw.text_linear + fw.time_linear
    if kind == "forward":
        t = lin / g + fw.self_attention / sf + fw.cross_attention / cf
    elif kind == "tangent":
        t = (2 * fw.token_linear + fw.text_linear + 2 * fw.time_linear) / g \
            + 3 * fw.self_attention / sf + 2 * fw.cross_attention / cf
    else:  # backward of one forward: 2x the linears, attention backward
        t = 2 * lin / g + 2 * fw.self_attention / rates["attn_self_bwd"] + 2 * fw.cross_attention / rates["attn_cross_bwd"]
    return calls * t / 1e9


def pass_flops(fw, kind: str, samples: int) -> float:
    """Model FLOPs of a pass that ran ``samples`` sample-forwards (a call on a micro-batch of 2 is 2)."""
    return samples * {"forward": fw.total, "tangent": fw.tangent, "backward": 2 * fw.total}[kind]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--label", default=None,
                    help="what this run measures (baseline, an optimization); default: 'default path' and the extra flags")
    ap.add_argument("--recompute-num-layers", type=int, default=1, help="0: no activation recompute")
    ap.add_argument("--tiny", action="store_true", help="CPU test of this script: the tiny model, wall-clock timing, no ceilings")
    ap.add_argument("extra", nargs="*", help="more pretrain_rcm.py flags (after --)")
    args = ap.parse_args(argv)
    if args.label is None:
        args.label = " ".join(["default path", *args.extra])

    import time

    import torch

    import pretrain_rcm
    from rcm_megatron.kernels.dispatch import add_pass_observer, remove_pass_observer
    from rcm_megatron.models.config import preset
    from rcm_megatron.models.wan import WanDiT
    from rcm_megatron.training.throughput import peak_tflops, wan_forward_flops

    switches = path_switches(args.extra)
    fp8 = switches["fp8_teacher"]
    cuda = not args.tiny
    card = torch.cuda.get_device_name() if cuda else "cpu"
    rates = ceiling_rates(fp8) if cuda else None
    events: list = []  # (name, start, end, calls)
    open_passes: list = []

    def stamp():
        if not cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def elapsed_ms(start, end) -> float:
        return start.elapsed_time(end) if cuda else (end - start) * 1e3

    def observer(name, begins):
        ev = stamp()
        if begins:
            open_passes.append([name, ev, None, 0])
        else:
            entry = open_passes.pop()
            entry[2] = ev
            events.append(entry)

    def count_calls(module, inputs):  # samples through the network (a rollout calls it on the samples left)
        if isinstance(module, WanDiT) and open_passes:
            open_passes[-1][3] += int(inputs[0].shape[0])

    add_pass_observer(observer)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(count_calls)
    recompute = ["--recompute-granularity", "full", "--recompute-num-layers", str(args.recompute_num_layers)] \
        if args.recompute_num_layers else []
    log_dir = tempfile.mkdtemp(prefix="rcm_step_")
    flags = (TINY_FLAGS if args.tiny else FLAGS) + recompute + ["--log-dir", log_dir] + args.extra
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        rc = pretrain_rcm.main(flags)
    finally:
        hook.remove()
        remove_pass_observer(observer)
    if cuda:
        torch.cuda.synchronize()
    if rc != 0:
        print(f"rcm_step: pretrain_rcm.py exited {rc}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]
    if args.tiny:
        tokens, text_len = TINY_LATENT[1] * TINY_LATENT[2] * TINY_LATENT[3] // 4, TINY_TEXT_LEN
        fw = wan_forward_flops(preset("tiny"), tokens, text_len)
    else:
        tokens, text_len = S, L
        fw = wan_forward_flops(preset("wan-1.3b"), S, L)

    # Split the pass sequence into iterations: each starts with its first pass.
    iters, current = [], None
    for name, start, end, calls in events:
        if name in ("teacher CFG (sCM)", "student rollout (critic)"):
            current = []
            iters.append(current)
        kind = pass_kind(name)
        if kind == "backward":  # a backward differentiates the with-grad forward just before it
            calls = current[-1]["samples"]
        elif kind == "tangent":
            calls = max(calls, MICRO_BATCH)  # forward_with_tangent is not a module call
        current.append({"pass": name, "ms": elapsed_ms(start, end), "samples": calls, "kind": kind,
                        "fp8": is_fp8_pass(name, fp8)})
    if len(iters) != len(rows):
        print(f"rcm_step: {len(iters)} iterations of passes but {len(rows)} metrics rows", file=sys.stderr)
        return 1
    period = list(range(2, 7))  # iterations 3..7: critic x3, the rCM student step, critic (2 compiles the critic path)
    by_pass = defaultdict(list)
    for i in period:
        for p in iters[i]:
            by_pass[(rows[i]["phase"], p["pass"])].append(p)
    peak = peak_tflops(card) if cuda else None
    precision = "bf16" if "--bf16" in flags else "fp32"
    table = []
    for (phase, name), ps in by_pass.items():
        ms = sum(p["ms"] for p in ps) / len(ps)
        calls = sum(p["samples"] for p in ps) / len(ps)
        flops = pass_flops(fw, ps[0]["kind"], calls)
        ceil = ceiling_ms(fw, ps[0]["kind"], calls, rates, fp8=ps[0]["fp8"])
        table.append({"phase": phase, "pass": name, "precision": "fp8" if ps[0]["fp8"] else precision, "ms": ms,
                      "samples": calls, "model_tflops": flops / ms / 1e9, "ceiling_ms": ceil,
                      "fraction_of_ceiling": None if ceil is None else ceil / ms})
    iter_rows = []
    for i in period:
        r = rows[i]
        secs = MICRO_BATCH / r["samples_per_sec"]
        in_passes = sum(p["ms"] for p in iters[i]) / 1e3
        exact = sum(pass_flops(fw, p["kind"], p["samples"]) for p in iters[i])
        fp8_flops = sum(pass_flops(fw, p["kind"], p["samples"]) for p in iters[i] if p["fp8"])
        fp8_s = sum(p["ms"] for p in iters[i] if p["fp8"]) / 1e3
        iter_rows.append({"iteration": r["iteration"], "phase": r["phase"], "seconds": secs,
                          "model_tflops_per_gpu": r["model_tflops_per_gpu"], "exact_model_tflops": exact / secs / 1e12,
                          "fp8_teacher_flops": fp8_flops, "fp8_teacher_seconds": fp8_s, "bf16_flops": exact - fp8_flops,
                          "outside_passes_s": secs - in_passes, "mem_peak_allocated_gib": r.get("mem_peak_allocated_gib")})
    total_s = sum(r["seconds"] for r in iter_rows)
    period_tflops = sum(r["model_tflops_per_gpu"] * r["seconds"] for r in iter_rows) / total_s
    period_exact = sum(r["exact_model_tflops"] * r["seconds"] for r in iter_rows) / total_s
    fp8_s = sum(r["fp8_teacher_seconds"] for r in iter_rows)
    fp8_flops = sum(r["fp8_teacher_flops"] for r in iter_rows)
    period_bf16 = sum(r["bf16_flops"] for r in iter_rows) / (total_s - fp8_s) / 1e12
    fp8_summary = None
    if fp8:
        fp8_tflops = fp8_flops / fp8_s / 1e12 if fp8_s else None
        fp8_summary = {"seconds": fp8_s, "model_tflops": fp8_tflops, "peak_tflops": peak and FP8_PEAK_FACTOR * peak,
                       "mfu_of_fp8_peak": fp8_tflops / (FP8_PEAK_FACTOR * peak) if peak and fp8_tflops else None}
    now = _dt.datetime.now(_dt.timezone.utc)
    versions = {"torch": torch.__version__}
    if cuda:
        import triton

        versions["triton"] = triton.__version__
    mem = [r["mem_peak_allocated_gib"] or 0 for r in iter_rows] + \
        ([torch.cuda.max_memory_allocated() / 2**30] if cuda else [])
    result = {"card": card, "date": now.isoformat(), "label": args.label, **switches,
              "command": "python benchmarks/rcm_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "pretrain_flags": " ".join(flags), **versions, "tokens": tokens, "text_len": text_len,
              "period_model_tflops_per_gpu": period_tflops, "period_exact_model_tflops_per_gpu": period_exact,
              "period_mfu": period_tflops / peak if peak else None,
              "period_bf16_model_tflops_per_gpu": period_bf16, "period_bf16_mfu": period_bf16 / peak if peak else None,
              "fp8_teacher_passes": fp8_summary, "period_seconds": total_s, "peak_memory_gib": max(mem),
              "ceiling_rates_tflops": rates, "passes": table, "iterations": iter_rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"rcm_step_{now:%Y%m%dT%H%M%SZ}_{card_slug(card)}.json")
    json.dump(result, open(path, "w"), indent=1)
    print(f"rcm_step on {card} ({args.label}); {os.path.relpath(path, ROOT)}")
    if rates:
        print("ceiling rates (TFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    print(f"{'phase':8s} {'pass':32s} {'prec':4s} {'ms':>9s} {'smpls':>5s} {'TFLOP/s':>8s} {'ceil ms':>9s} {'frac':>5s}")
    for t in table:
        ceil = "-" if t["ceiling_ms"] is None else f"{t['ceiling_ms']:9.1f}"
        frac = "-" if t["fraction_of_ceiling"] is None else f"{t['fraction_of_ceiling']:5.2f}"
        print(f"{t['phase']:8s} {t['pass']:32s} {t['precision']:4s} {t['ms']:9.1f} {t['samples']:5.1f} "
              f"{t['model_tflops']:8.3g} {ceil:>9s} {frac:>5s}")
    for r in iter_rows:
        print(f"iter {r['iteration']:2d} {r['phase']:8s} {r['seconds']:7.2f} s  {r['model_tflops_per_gpu']:6.3g} TFLOP/s "
              f"(exact {r['exact_model_tflops']:4.3g})  outside passes {r['outside_passes_s']:5.2f} s  "
              f"peak {r['mem_peak_allocated_gib'] or 0:5.1f} GiB")
    print(f"period (1 student + 4 critic): {period_tflops:.3g} model TFLOP/s per GPU "
          f"(exact counts {period_exact:.3g}), MFU {result['period_mfu'] or 0:.3f}, peak {result['peak_memory_gib']:.1f} GiB")
    if fp8_summary:
        print(f"FP8 teacher passes: {fp8_s:.2f} s, {fp8_summary['model_tflops'] or 0:.3g} model TFLOP/s "
              f"(MFU {fp8_summary['mfu_of_fp8_peak'] or 0:.3f} of the FP8 peak); the other passes: "
              f"{period_bf16:.3g} bf16 model TFLOP/s over the rest of the period (MFU {result['period_bf16_mfu'] or 0:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
