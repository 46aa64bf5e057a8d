#!/usr/bin/env python
"""Plan per-GPU memory and step time of rCM training; list the layouts that fit, best first.

    python tools/plan_memory.py --model wan-14b --gpus 8 --gpu-memory-gib 80 --latent-shape 16 21 60 104

Each row: layout flags for pretrain_rcm.py, peak GiB per GPU (student step / critic step),
headroom, host GiB per GPU (optimizer CPU offload), estimated seconds per student step,
critic step and mean iteration. The best (fastest that fits) is marked with '*', and its
memory breakdown follows. Figures marked 'estimate' in docs/memory_plan.md (communication,
ZeRO-3 gathers, offload) come from stated bandwidths, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rcm_megatron.cli import ArgumentParser  # noqa: E402
from rcm_megatron.models.config import PRESETS, preset  # noqa: E402
from rcm_megatron.planning.layout import Workload  # noqa: E402
from rcm_megatron.planning.memory import GIB  # noqa: E402
from rcm_megatron.planning.search import fitting_layouts  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(PRESETS), required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory-gib", type=float, required=True)
    p.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), required=True)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=64, help="samples per iteration (default 64, the recipe's)")
    p.add_argument("--method", choices=("rcm", "scm", "dmd", "dcm"), default="rcm")
    p.add_argument("--teacher-experts", type=int, choices=(1, 2), default=1,
                   help="2: a two-expert teacher (Wan2.2 A14B), both experts' weights on every rank")
    p.add_argument("--student-update-freq", type=int, default=10)
    p.add_argument("--headroom", type=float, default=0.1, help="free fraction of the GPU required (default 0.1)")
    p.add_argument("--zero", type=int, nargs="+", choices=(0, 1, 3), default=[1, 3],
                   help="ZeRO levels to consider: 0 none, 1 distributed optimizer, 3 parameter sharding")
    p.add_argument("--host-memory-gib-per-gpu", type=float, default=None)
    p.add_argument("--max-tp", type=int, default=8)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--markdown", action="store_true", help="a markdown table (docs/memory_plan.md)")
    p.add_argument("--json", default=None, help="also write every fitting layout to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        w = Workload(preset(args.model), tuple(args.latent_shape), args.text_len, method=args.method,
                     student_update_freq=args.student_update_freq, global_batch_size=args.global_batch_size,
                     teacher_experts=args.teacher_experts)
    except ValueError as e:
        print(f"plan_memory: {e}", file=sys.stderr)
        return 2
    if args.gpus < 1 or args.gpu_memory_gib <= 0:
        print("plan_memory: --gpus and --gpu-memory-gib must be positive", file=sys.stderr)
        return 2
    fits = fitting_layouts(w, args.gpus, args.gpu_memory_gib, args.headroom, args.host_memory_gib_per_gpu,
                           max_tp=args.max_tp, zero_levels=tuple(args.zero), micro_batch_size=args.micro_batch_size)
    print(f"{args.model}, latents {args.latent_shape} = {w.tokens} tokens, text {args.text_len}, "
          f"{args.gpus} GPUs x {args.gpu_memory_gib:g} GiB, headroom >= {args.headroom:.0%}: "
          f"{len(fits)} layouts fit")
    if not fits:
        return 1
    print(table(fits[:args.top], args.markdown))
    print()
    print(breakdown(fits[0], args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([record(c) for c in fits], f, indent=1)
    return 0


def record(c) -> dict:
    return {"flags": c.layout.flags(), "dp": c.layout.dp, "peak_gib": c.memory.peak / GIB,
            "phases_gib": {k: v / GIB for k, v in c.memory.phase_totals.items()}, "headroom": c.headroom,
            "host_gib": c.memory.host_bytes / GIB, "seconds": c.seconds}


def table(cands, markdown: bool) -> str:
    head = ["", "layout (pretrain_rcm.py flags)", "DP", "student/critic GiB", "headroom", "host GiB",
            "student s", "critic s", "iteration s"]
    rows = []
    for i, c in enumerate(cands):
        ph = c.memory.phase_totals
        rows.append(["*" if i == 0 else "", c.layout.flags(), str(c.layout.dp),
                     f"{ph['student_step'] / GIB:.1f}/{ph.get('critic_step', 0) / GIB:.1f}", f"{c.headroom:.0%}",
                     f"{c.memory.host_bytes / GIB:.1f}", f"{c.seconds['student_step']:.2f}",
                     f"{c.seconds['critic_step']:.2f}", f"{c.seconds['iteration']:.2f}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(r[:1] + [f"`{r[1]}`"] + r[2:]) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    return "\n".join("  ".join(x.ljust(wd) for x, wd in zip(r, widths)) for r in [head] + rows)


def breakdown(c, markdown: bool) -> str:
    phases = c.memory.phases
    names = list(phases)
    keys = list(dict.fromkeys(k for ph in phases.values() for k in ph))
    lines = [f"best layout, pipeline stage {c.memory.stage} (GiB per GPU):"]
    if markdown:
        lines = [lines[0], "", "| item | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for k in keys:
        vals = [f"{phases[n].get(k, 0) / GIB:.2f}" for n in names]
        lines.append(f"| {k} | " + " | ".join(vals) + " |" if markdown else f"  {k:32s} " + "  ".join(vals))
    tot = [f"{c.memory.phase_totals[n] / GIB:.2f}" for n in names]
    lines.append(("| **total** | " + " | ".join(tot) + " |") if markdown else f"  {'total':32s} " + "  ".join(tot))
    if c.memory.host_states:
        host = ", ".join(f"{k} {v / GIB:.2f}" for k, v in c.memory.host_states.items())
        lines.append(("" if not markdown else "\n") + f"host (optimizer CPU offload): {host} GiB")
    s = c.seconds
    lines.append(("\n" if markdown else "") + f"time: compute student {s['compute_student']:.2f} s, critic "
                 f"{s['compute_critic']:.2f} s (measured rates); estimates: gradient sync "
                 f"{s['grad_sync_estimate']:.2f} s, ZeRO-3 gathers {s['fsdp_gather_estimate']:.2f} s, "
                 f"offload {s['offload_estimate']:.2f} s per step")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
