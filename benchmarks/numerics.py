#!/usr/bin/env python
"""Numerics of the fast paths at Wan-1.3B width and 32,760 tokens, against fp32.

- the student's tangent pass (``forward_with_tangent``) under bf16 autocast with compiled blocks
  (the trainer's default on one GPU, ``--compile-blocks auto``), eager with the fused tangent kernels
  (``--fused-tangent-ops``) and eager without them (the eager default): relative L2 error of F and dF against the same pass in fp32
  (fp32 weights, no autocast, TF32 off, plain-math attention run in query chunks), and how far the
  sCM target moves: relative error of g = -cos t (F - F_T) - (cos t sin t x_t + dF) (r = 1, F_T
  from the fp32 teacher) and of its normalized direction g / ||g|| (what the loss uses);
- the bf16 and FP8 teacher (``--fp8-teacher``) against the fp32 teacher, and FP8 against bf16.

Random weights (the real architecture, ``--layers`` of its 30 blocks); one sample, t = 0.8 rad.
Writes JSON with card, date and command after every row (a cut-off run keeps what it measured),
prints a table. On one H100/H200, 30 layers: about 3 minutes (each step's time is printed).

    python benchmarks/numerics.py --out benchmarks/results [--layers 30] [--no-compiled]
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
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    return args


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
    tokens = latent[1] * latent[2] * latent[3] // (cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
    fused_on = "auto" if dev == "cuda" else "on"
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()
    path = os.path.join(args.out, f"numerics_{now:%Y%m%dT%H%M%SZ}_{slug}.json")
    rows: dict = {}
    result = {"card": card, "date": now.isoformat(),
              "command": "python benchmarks/numerics.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "model": "tiny" if args.tiny else "wan-1.3b", "layers": cfg.num_layers,
              "tokens": tokens, "t": 0.8, "relative_l2_error_vs_fp32": rows}
    t0 = time.perf_counter()

    def log(what):
        print(f"[{time.perf_counter() - t0:6.1f} s] {what}", flush=True)

    def record(name, row):
        rows[name] = row
        json.dump(result, open(path, "w"), indent=1)
        log(f"{name}: " + "  ".join(f"{k} {v:.2e}" for k, v in row.items()))

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

        tangent_row("tangent pass bf16, eager, fused kernels", fused_on)
        tangent_row("tangent pass bf16, eager, PyTorch ops", "off")
        if dev == "cuda" and not args.no_compiled:
            student.compile_blocks()
            tangent_row("tangent pass bf16, compiled blocks (default)", "off")
        del student
        teacher_bf16 = teacher.to_dtype(torch.bfloat16)
        with fused_ops(fused_on), autocast:
            Fb = predict(teacher_bf16, x_t, t, ctx).F
            record("teacher bf16", {"F": rel(Fb, F_T)})
            teacher_bf16.quantize_fp8()
            F8 = predict(teacher_bf16, x_t, t, ctx).F
            record("teacher fp8", {"F": rel(F8, F_T), "F vs bf16": rel(F8, Fb)})
    print(f"numerics on {card}: relative L2 error against fp32 ({os.path.relpath(path, ROOT)})")
    for name, r in rows.items():
        print(f"{name:42s} " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
