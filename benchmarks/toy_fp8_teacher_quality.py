#!/usr/bin/env python
"""The toy quality benchmark with and without ``--fp8-teacher`` (docs/quality.md, "FP8 teacher"):
does an FP8 teacher change what the student learns, beyond the benchmark's seed-to-seed noise?

rCM students distilled from the shipped toy teacher with the toy defaults, 300 iterations (the
README's main command), training seeds 1234, 4321 and 2024, each once with the full-precision
(fp32 on CPU) teacher and once with ``--fp8-teacher``; every student evaluated by
``tools/evaluate.py`` with the same sampling noise (official and paper sampler times). This script
reads those evaluation JSONs and writes the summary: FD and precision per seed and step count, each
arm's mean and seed standard deviation, the paired FP8 - full differences, and whether the mean
difference is within the seed noise (|mean difference| <= the full-precision arm's seed std); and the
FP8 toy teacher's own error against fp32 by time (``teacher_error``).

    for s in 1234 4321 2024; do
      python pretrain_rcm.py --method rcm --train-iters 300 --seed $s --log-dir runs/fp8q/rcm_s$s
      python pretrain_rcm.py --method rcm --train-iters 300 --seed $s --fp8-teacher --log-dir runs/fp8q/rcm_fp8_s$s
    done
    S=$(for s in 1234 4321 2024; do echo --student rcm_s$s=runs/fp8q/rcm_s$s/checkpoints \\
        --student rcm_fp8_s$s=runs/fp8q/rcm_fp8_s$s/checkpoints; done)
    python tools/evaluate.py $S --skip-untrained --no-plot --teacher-from benchmarks/results/toy_quality.json \\
        --out runs/fp8q/official
    python tools/evaluate.py $S --skip-untrained --no-plot --mid-times 1.3 1.0 0.6 \\
        --teacher-from benchmarks/results/toy_quality_paper_times.json --out runs/fp8q/paper
    python benchmarks/toy_fp8_teacher_quality.py --official runs/fp8q/official.json --paper runs/fp8q/paper.json \\
        --out benchmarks/results/toy_quality_fp8_teacher.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

METRICS = ("fd", "precision", "coverage", "mode_entropy")


def student_rows(paths: list[str]) -> dict:
    """{(arm, seed): {steps: {metric: value}}} from evaluate.py JSONs (students named rcm[_fp8]_s<seed>)."""
    out = {}
    for path in paths:
        methods = json.load(open(path))["methods"]
        for name, by_steps in methods.items():
            m = re.fullmatch(r"rcm(_fp8)?_s(\d+)", name)
            if m is None:
                continue
            arm = "fp8" if m.group(1) else "full"
            out[(arm, int(m.group(2)))] = {int(k): {x: v[x] for x in METRICS} for k, v in by_steps.items()}
    return out


def summarize(rows: dict) -> dict:
    seeds = sorted({s for _, s in rows})
    missing = [(a, s) for a in ("full", "fp8") for s in seeds if (a, s) not in rows]
    if missing:
        raise SystemExit(f"toy_fp8_teacher_quality: no evaluation of {missing}")
    steps = sorted(rows[("full", seeds[0])])
    summary = {}
    for k in steps:
        entry = {}
        for metric in ("fd", "precision"):
            full = [rows[("full", s)][k][metric] for s in seeds]
            fp8 = [rows[("fp8", s)][k][metric] for s in seeds]
            diff = [b - a for a, b in zip(full, fp8)]
            noise = statistics.stdev(full)
            entry[metric] = {"full": full, "fp8": fp8, "full_mean": statistics.mean(full), "fp8_mean": statistics.mean(fp8),
                             "full_seed_std": noise, "fp8_seed_std": statistics.stdev(fp8), "fp8_minus_full": diff,
                             "mean_difference": statistics.mean(diff),
                             "within_seed_noise": abs(statistics.mean(diff)) <= noise}
        summary[str(k)] = entry
    return {"seeds": seeds, "by_steps": summary,
            "per_student": {f"{a}_s{s}": r for (a, s), r in sorted(rows.items())}}


def teacher_error(num_samples: int = 256, times=(50, 200, 500, 800, 950)) -> dict:
    """Relative L2 error of the shipped toy teacher with --fp8-teacher against itself in fp32, on held-out toy
    videos noised to each time (rectified flow, diffusers' 0..1000 scale): the conditional velocity, the CFG-2
    velocity and its x0 prediction (what DMD regresses to); and FP8 weights alone (activations unquantized)."""
    import copy
    import os
    import sys

    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import rcm_megatron.kernels.fp8 as fp8
    from rcm_megatron.checkpointing.loading import open_model
    from rcm_megatron.data.toy import ToyVideoLatents

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full, _ = open_model(os.path.join(root, "assets", "toy_teacher.pt"))
    quant = copy.deepcopy(full)
    quant.quantize_fp8()
    ds = ToyVideoLatents(seed=0)
    items = [ds[i] for i in range(num_samples)]
    x0 = torch.stack([d["latents"] for d in items])
    ctx = torch.stack([d["context"] for d in items])
    unc = torch.zeros_like(ctx)
    g = torch.Generator().manual_seed(0)
    fp8_linear = fp8.fp8_linear

    def weights_only(x, wq, ws, bias=None):
        y = x.float() @ (wq.float() * ws).t()
        return (y if bias is None else y + bias).to(x.dtype)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    out = {}
    with torch.no_grad():
        for tt in times:
            s = tt / 1000
            xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
            t = torch.full((len(items),), float(tt))
            vc, vu = full(xt, t, ctx), full(xt, t, unc)
            qc, qu = quant(xt, t, ctx), quant(xt, t, unc)
            cfg, qcfg = vu + 2 * (vc - vu), qu + 2 * (qc - qu)
            fp8.fp8_linear = weights_only
            try:
                wc = quant(xt, t, ctx)
            finally:
                fp8.fp8_linear = fp8_linear
            out[str(tt)] = {"v_cond": rel(qc, vc), "v_cfg": rel(qcfg, cfg), "x0_cfg": rel(xt - s * qcfg, xt - s * cfg),
                            "v_cond_weights_only": rel(wc, vc)}
            print(f"t = {tt:4d}: " + "  ".join(f"{k} {v:.4f}" for k, v in out[str(tt)].items()), flush=True)
    return {"num_samples": num_samples, "relative_l2_error_vs_fp32": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--official", nargs="+", required=True, help="evaluate.py JSONs with the official sampler times")
    ap.add_argument("--paper", nargs="*", default=[], help="evaluate.py JSONs with the paper's times (--mid-times 1.3 1.0 0.6)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="", help="how the runs were made (machine, threads)")
    ap.add_argument("--no-teacher-error", action="store_true", help="skip the FP8 toy teacher's own error (about 1 minute)")
    args = ap.parse_args(argv)
    result = {"setting": "rCM, toy defaults, 300 iterations, EMA weights, 1024 videos per row; arms: full-precision "
                         "(fp32) teacher and --fp8-teacher; same evaluation noise seed", "note": args.note,
              "official_times": summarize(student_rows(args.official)),
              "sources": {"official": args.official, "paper": args.paper}}
    if args.paper:
        result["paper_times"] = summarize(student_rows(args.paper))
    if not args.no_teacher_error:
        result["fp8_teacher_error"] = teacher_error()
    for times in ("official_times", "paper_times"):
        for k, e in result.get(times, {}).get("by_steps", {}).items():
            f = e["fd"]
            print(f"{times:14s} {k} step(s): FD full {f['full_mean']:.3f} +- {f['full_seed_std']:.3f}, "
                  f"fp8 {f['fp8_mean']:.3f} +- {f['fp8_seed_std']:.3f}, mean difference {f['mean_difference']:+.3f} "
                  f"({'within' if f['within_seed_noise'] else 'OUTSIDE'} the seed noise)")
    json.dump(result, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
