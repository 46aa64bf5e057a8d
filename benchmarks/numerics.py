#!/usr/bin/env python
"""Numerics of the fast paths at Wan-1.3B width and 32,760 tokens, against fp32.

- the student's tangent pass (``forward_with_tangent``) under bf16 autocast, eager and with
  compiled blocks: relative L2 error of v and dv against the same pass in fp32 (fp32 weights,
  no autocast), and how far the sCM target direction g moves (relative error of
  g = -cos t (F_sg - F_T) - (cos t sin t x_t + dF) at r = 1, with F_T from the fp32 teacher);
- the FP8 teacher (``--fp8-teacher``) against the bf16 and fp32 teacher.

Random weights (the real architecture); one sample, t = 0.8 rad. Writes JSON with card, date and
command, prints a table.

    python benchmarks/numerics.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--layers", type=int, default=4, help="blocks (the fp32 reference runs the fused kernel in fp32, slowly)")
    args = ap.parse_args(argv)

    import torch

    from rcm_megatron.models import WanDiT, preset
    from rcm_megatron.rcm.trigflow import predict, predict_with_tangent

    dev = "cuda"
    cfg = preset("wan-1.3b").replace(num_layers=args.layers)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 16, 21, 60, 104, generator=g).double().to(dev)
    ctx = torch.randn(1, 512, 4096, generator=g).to(dev)
    t = torch.tensor([0.8], dtype=torch.float64, device=dev)
    cos, sin = math.cos(0.8), math.sin(0.8)
    student = WanDiT(cfg).to(dev)  # fp32 master weights, as the trainer's student
    student.reset_parameters(seed=1)
    teacher = WanDiT(cfg).to(dev)
    with torch.no_grad():
        F_T = predict(teacher, x_t, t, ctx).F  # fp32 teacher, the reference F_T

        def tangent_pass():
            return predict_with_tangent(student, x_t, t, ctx, cos * sin * F_T, torch.full((1,), cos * sin,
                                                                                        dtype=torch.float64, device=dev))

        def g_of(F, dF):
            return -cos * (F - F_T) - (cos * sin * x_t + dF)

        F32, dF32 = tangent_pass()
        g32 = g_of(F32, dF32)
        rows = {}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            F, dF = tangent_pass()
        rows["tangent pass bf16 (eager)"] = {"F": rel(F, F32), "dF": rel(dF, dF32), "g": rel(g_of(F, dF), g32)}
        student.compile_blocks()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            F, dF = tangent_pass()
        rows["tangent pass bf16 (compiled blocks)"] = {"F": rel(F, F32), "dF": rel(dF, dF32), "g": rel(g_of(F, dF), g32)}
        del student
        teacher_bf16 = teacher.to_dtype(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            Fb = predict(teacher_bf16, x_t, t, ctx).F
            teacher_bf16.quantize_fp8()
            F8 = predict(teacher_bf16, x_t, t, ctx).F
        rows["teacher bf16"] = {"F": rel(Fb, F_T)}
        rows["teacher fp8"] = {"F": rel(F8, F_T), "F vs bf16": rel(F8, Fb)}
    card = torch.cuda.get_device_name()
    now = _dt.datetime.now(_dt.timezone.utc)
    result = {"card": card, "date": now.isoformat(), "command": "python benchmarks/numerics.py " + " ".join(sys.argv[1:]),
              "torch": torch.__version__, "layers": args.layers, "tokens": 32760, "t": 0.8,
              "relative_l2_error_vs_fp32": rows}
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()
    path = os.path.join(args.out, f"numerics_{now:%Y%m%dT%H%M%SZ}_{slug}.json")
    json.dump(result, open(path, "w"), indent=1)
    print(f"numerics on {card}: relative L2 error against fp32 ({os.path.relpath(path, ROOT)})")
    for name, r in rows.items():
        print(f"{name:38s} " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
