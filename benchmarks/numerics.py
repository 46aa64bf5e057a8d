#!/usr/bin/env python
"""Numerics of the fast paths at Wan-1.3B width and 32,760 tokens, against fp32.

- the student's tangent pass (``forward_with_tangent``) under bf16 autocast with compiled blocks
  (the trainer's default on one GPU, ``--compile-blocks auto``), eager with the fused tangent kernels
  (``--fused-tangent-ops``) and eager without them (the eager default): relative L2 error of F and dF against the same pass in fp32
  (fp32 weights, no autocast, TF32 off, plain-math attention run in query chunks), and how far the
  sCM target moves: relative error of g = -cos t (F - F_T) - (cos t sin t x_t + dF) (r = 1, F_T
  from the fp32 teacher) and of its normalized direction g / ||g|| (what the loss uses);
- the bf16 and FP8 teacher (``--fp8-teacher``) against the fp32 teacher, and FP8 against bf16:
  the network output v and F; with ``--fp8-teacher`` (the FP8 mode) only the teacher rows, plus
  the FP8 teacher with fp32 activations (its quantization error alone) and how far each teacher's
  F_T moves g (through F_T and the tangent direction it sets; the student's pass in fp32).

Random weights (the real architecture, ``--layers`` of its 30 blocks); one sample, t = 0.8 rad.
Writes JSON with card (the CPU's model name on CPU), date and command after every row (a cut-off
run keeps what it measured), prints a table. On one H100/H200, 30 layers: about 3 minutes (each
step's time is printed).

    python benchmarks/numerics.py --out benchmarks/results [--layers 30] [--no-compiled]
    python benchmarks/numerics.py --fp8-teacher --out benchmarks/results [--layers 30]   # FP8 mode
    python benchmarks/numerics.py --fp8-teacher --layers 2 --latent-shape 16 2 60 104    # CPU: 3,120 tokens
    python benchmarks/numerics.py --tiny --out /tmp/numerics   # CPU: tiny model, Triton interpreter
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def direction_error(a, b) -> float:
    """Relative error of a / ||a|| against b / ||b||."""
    a, b = a.double(), b.double()
    return float((a / a.norm() - b / b.norm()).norm())


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--layers", type=int, default=30, help="blocks of Wan-1.3B (30: the whole model)")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled-blocks tangent pass (its compile: ~1 min)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model at 32 tokens (CPU test of this script)")
    ap.add_argument("--fp8-teacher", action="store_true", help="FP8 mode: the teacher rows only (fp32, bf16, FP8) and g")
    ap.add_argument("--latent-shape", type=int, nargs=4, default=None, metavar=("C", "T", "H", "W"),
                    help="Wan-1.3B latents (default 16 21 60 104: 480p, 32,760 tokens)")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if args.latent_shape is not None and (args.tiny or args.latent_shape[0] != 16 or min(args.latent_shape) < 1
                                          or args.latent_shape[2] % 2 or args.latent_shape[3] % 2):
        ap.error(f"--latent-shape must be 16 T H W with even H, W (Wan-1.3B, patch 1x2x2), not with --tiny; "
                 f"got {args.latent_shape}")
    return args


def machine(torch, dev: str) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if dev == "cuda":
        return torch.cuda.get_device_name()
    import platform

    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({name}, {os.cpu_count()} cores)"


def main(argv=None) -> int:
    args = parse(argv)
    if args.tiny:  # the fused kernels run under the Triton interpreter without a GPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from rcm_megatron.kernels import attention_backend
    from rcm_megatron.kernels.fused_ops import fused_ops
    from rcm_megatron.models import WanDiT, preset
    from rcm_megatron.rcm.trigflow import predict, predict_with_tangent

    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32
    torch.backends.cudnn.allow_tf32 = False
    if args.tiny:
        cfg, latent, text = preset("tiny").replace(num_layers=1), (16, 2, 8, 8), (16, 64)
    else:
        cfg, latent, text = preset("wan-1.3b").replace(num_layers=args.layers), (16, 21, 60, 104), (512, 4096)
        latent = tuple(args.latent_shape or latent)
    tokens = latent[1] * latent[2] * latent[3] // (cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
    fused_on = "auto" if dev == "cuda" else ("on" if args.tiny else "off")  # Triton kernels: interpreter on CPU
    card = "cpu" if args.tiny else machine(torch, dev)
    now = _dt.datetime.now(_dt.timezone.utc)
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()
    path = os.path.join(args.out, f"numerics_{now:%Y%m%dT%H%M%SZ}_{slug}.json")
    rows: dict = {}
    result = {"card": card, "date": now.isoformat(),
              "command": "python benchmarks/numerics.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "model": "tiny" if args.tiny else "wan-1.3b", "layers": cfg.num_layers,
              "tokens": tokens, "latent_shape": list(latent), "text_len": text[0], "t": 0.8,
              "mode": "fp8 teacher" if args.fp8_teacher else "all", "relative_l2_error_vs_fp32": rows}
    t0 = time.perf_counter()

    def log(what):
        print(f"[{time.perf_counter() - t0:6.1f} s] {what}", flush=True)

    def record(name, row):
        rows[name] = row
        json.dump(result, open(path, "w"), indent=1)
        log(f"{name}: " + "  ".join(f"{k} {v:.2e}" for k, v in row.items()))

    outputs = []  # the network output v of the last WanDiT call (the teacher's, before the TrigFlow wrapper)
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: outputs.append(o.detach().double()) if isinstance(m, WanDiT) else None)

    def network_output(net):
        v = outputs.pop()
        outputs.clear()
        return v

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, *latent, generator=g).double().to(dev)
    ctx = torch.randn(1, *text, generator=g).to(dev)
    t = torch.tensor([0.8], dtype=torch.float64, device=dev)
    cos, sin = math.cos(0.8), math.sin(0.8)
    student = WanDiT(cfg).to(dev)  # fp32 master weights, as the trainer's student
    student.reset_parameters(seed=1)
    teacher = WanDiT(cfg).to(dev)
    log(f"built {cfg.num_layers}-layer models on {card}, {tokens} tokens")
    autocast = torch.autocast(dev, dtype=torch.bfloat16)
    with torch.no_grad():
        with fused_ops("off"):
            F_T = predict(teacher, x_t, t, ctx).F  # fp32 teacher, the reference F_T
            v_T = network_output(teacher)
        log("fp32 teacher")
        dt = torch.full((1,), cos * sin, dtype=torch.float64, device=dev)

        def tangent_pass():
            return predict_with_tangent(student, x_t, t, ctx, cos * sin * F_T, dt)

        def g_of(F, dF):
            return -cos * (F - F_T) - (cos * sin * x_t + dF)

        with fused_ops("off"), attention_backend("reference"):  # plain math in fp32, query-chunked
            F32, dF32 = tangent_pass()
        g32 = g_of(F32, dF32)
        log("fp32 tangent pass (reference)")

        def tangent_row(name, mode):
            with fused_ops(mode), autocast:
                F, dF = tangent_pass()
            g_ = g_of(F, dF)
            record(name, {"F": rel(F, F32), "dF": rel(dF, dF32), "g": rel(g_, g32), "g direction": direction_error(g_, g32)})

        if not args.fp8_teacher:
            tangent_row("tangent pass bf16, eager, fused kernels", fused_on)
            tangent_row("tangent pass bf16, eager, PyTorch ops", "off")
            if dev == "cuda" and not args.no_compiled:
                student.compile_blocks()
                tangent_row("tangent pass bf16, compiled blocks (default)", "off")
            del student

        def teacher_row(name, net, against=None):
            """v (the network output) and F of ``net`` against fp32 (and ``against``: (v, F) of another
            teacher); in the FP8 mode also g with this F_T in place of the fp32 teacher's (the student's
            pass in fp32, so only the teacher's error moves g)."""
            F = predict(net, x_t, t, ctx).F
            v = network_output(net)
            row = {"v": rel(v, v_T), "F": rel(F, F_T)}
            if against is not None:
                row |= {"v vs bf16": rel(v, against[0]), "F vs bf16": rel(F, against[1])}
            if args.fp8_teacher:  # this F_T is also the tangent direction dx = cos t sin t F_T of the fp32 student pass
                with fused_ops("off"), attention_backend("reference"), torch.autocast(dev, enabled=False):
                    Fs, dFs = predict_with_tangent(student, x_t, t, ctx, cos * sin * F, dt)
                g_ = -cos * (Fs - F) - (cos * sin * x_t + dFs)
                row |= {"g": rel(g_, g32), "g direction": direction_error(g_, g32)}
            record(name, row)
            return v, F

        if args.fp8_teacher:  # the quantization error alone: FP8 weights and activations, fp32 elsewhere
            teacher8 = WanDiT(cfg).to(dev)
            teacher8.quantize_fp8()
            with fused_ops("off"):
                teacher_row("teacher fp8, fp32 activations", teacher8)
            del teacher8
        teacher_bf16 = teacher.to_dtype(torch.bfloat16)
        with fused_ops(fused_on), autocast:
            vb_Fb = teacher_row("teacher bf16", teacher_bf16)
            teacher_bf16.quantize_fp8()
            teacher_row("teacher fp8", teacher_bf16, against=vb_Fb)
    hook.remove()
    print(f"numerics on {card}: relative L2 error against fp32 ({os.path.relpath(path, ROOT)})")
    for name, r in rows.items():
        print(f"{name:42s} " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
