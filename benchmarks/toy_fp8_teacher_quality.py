#!/usr/bin/env python
"""The toy quality benchmark with and without ``--fp8-teacher`` (docs/quality.md, "FP8 teacher"):
does an FP8 teacher change what the student learns, beyond the benchmark's seed-to-seed noise?

rCM students distilled from the shipped toy teacher with the toy defaults, 300 iterations (the
README's main command), training seeds 99, 1234, 2024 and 4321, each once with the full-precision
(fp32 on CPU) teacher and once with ``--fp8-teacher`` (with ``--first-last-layers-bf16``: the FP8 arm
this script names ``--fp8-arm``); every student evaluated by ``tools/evaluate.py`` with the same
sampling noise (official and paper sampler times). This script reads those evaluation JSONs (a
student named again in a later file replaces the earlier row: how a re-run FP8 arm replaces the old
one while the full-precision rows are reused) and writes the summary: FD and precision per seed and
step count, each arm's mean and seed standard deviation, the paired FP8 - full differences, and
whether the mean difference is within the seed noise (|mean difference| <= the full-precision arm's
seed std); the FP8 toy teacher's own error against fp32 by time (``teacher_error``) and where it
comes from (``sensitivity``: by linear, by block, weights only, e4m3 rounding without range limits,
bf16 for scale).

    FP8="--fp8-teacher --first-last-layers-bf16"
    for s in 99 1234 2024 4321; do
      python pretrain_rcm.py --method rcm --train-iters 300 --seed $s --log-dir runs/fp8q/rcm_s$s
      python pretrain_rcm.py --method rcm --train-iters 300 --seed $s $FP8 --log-dir runs/fp8q/rcm_fp8_s$s
    done
    S=$(for s in 99 1234 2024 4321; do echo --student rcm_s$s=runs/fp8q/rcm_s$s/checkpoints \\
        --student rcm_fp8_s$s=runs/fp8q/rcm_fp8_s$s/checkpoints; done)
    python tools/evaluate.py $S --skip-untrained --no-plot --teacher-from benchmarks/results/toy_quality.json \\
        --out runs/fp8q/official
    python tools/evaluate.py $S --skip-untrained --no-plot --mid-times 1.3 1.0 0.6 \\
        --teacher-from benchmarks/results/toy_quality_paper_times.json --out runs/fp8q/paper
    python benchmarks/toy_fp8_teacher_quality.py --official runs/fp8q/official.json --paper runs/fp8q/paper.json \\
        --fp8-arm "$FP8" --out benchmarks/results/toy_quality_fp8_teacher_first_last_bf16.json
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


def _toy_teacher_and_videos(num_samples: int):
    """The shipped toy teacher (fp32) and held-out toy videos with their text context."""
    import os
    import sys

    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from rcm_megatron.checkpointing.loading import open_model
    from rcm_megatron.data.toy import ToyVideoLatents

    full, _ = open_model(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy_teacher.pt"))
    items = [ToyVideoLatents(seed=0)[i] for i in range(num_samples)]
    return full.eval(), torch.stack([d["latents"] for d in items]), torch.stack([d["context"] for d in items])


def sensitivity(num_samples: int = 256, times=(50, 200, 500, 950)) -> dict:
    """Where the FP8 toy teacher's error comes from: relative L2 error of the conditional velocity against
    fp32 with only some linears in FP8 (each kind of block linear over all blocks; each block; all but
    the first and last block), with all in FP8 but activations unquantized (weights only), with e4m3's
    3-bit mantissa rounding applied to weights and activations without any range limit or scale (what
    no finer scaling or smoothing can beat), and the bf16 teacher (bf16 weights, bf16 autocast) for scale."""
    import copy

    import torch

    full, x0, ctx = _toy_teacher_and_videos(num_samples)  # puts the repository on sys.path
    import rcm_megatron.kernels.fp8 as fp8
    from rcm_megatron.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    g = torch.Generator().manual_seed(0)
    cases = {}
    for tt in times:
        s = tt / 1000
        xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
        t = torch.full((num_samples,), float(tt))
        with torch.no_grad():
            cases[tt] = (xt, t, full(xt, t, ctx))
    linears = [n for n, m in full.blocks.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    def errors(model, autocast=False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return {str(tt): rel(model(xt, t, ctx), v) for tt, (xt, t, v) in cases.items()}

    def quantized(chosen):
        q = copy.deepcopy(full)
        mods = dict(q.blocks.named_modules())
        for n in linears:
            if chosen(n):
                mods[n].quantize_fp8()
        return q

    def weights_only(x, wq, ws, bias=None):
        y = x.float() @ (wq.float() * ws).t()
        return (y if bias is None else y + bias).to(x.dtype)

    def mantissa3(v):  # round to e4m3's 3 mantissa bits, unlimited exponent range
        m, e = torch.frexp(v.float())
        return torch.ldexp(torch.round(m * 16) / 16, e)

    out = {"all": errors(quantized(lambda n: True))}
    fp8_linear = fp8.fp8_linear
    fp8.fp8_linear = weights_only
    try:
        out["all, weights only"] = errors(quantized(lambda n: True))
    finally:
        fp8.fp8_linear = fp8_linear
    ideal = copy.deepcopy(full)
    with torch.no_grad():
        for n, m in ideal.blocks.named_modules():
            if n in linears:
                m.weight.copy_(mantissa3(m.weight))
                m.register_forward_pre_hook(lambda mod, args: (mantissa3(args[0]), *args[1:]))
    out["e4m3 mantissa rounding, no range limit"] = errors(ideal)
    out["bf16 teacher"] = errors(copy.deepcopy(full).to_dtype(torch.bfloat16), autocast=True)
    last = full.config.num_layers - 1
    out["all but the first and last block (--first-last-layers-bf16)"] = errors(
        quantized(lambda n: not (n.startswith("0.") or n.startswith(f"{last}."))))
    for kind in sorted({n.split(".", 1)[1] for n in linears}):
        out[f"only {kind}"] = errors(quantized(lambda n, k=kind: n.split(".", 1)[1] == k))
    for b in range(full.config.num_layers):
        out[f"only block {b}"] = errors(quantized(lambda n, b=b: n.startswith(f"{b}.")))
    for k, v in out.items():
        print(f"{k:60s} " + " ".join(f"{x:.4f}" for x in v.values()), flush=True)
    return {"num_samples": num_samples, "times": list(times), "relative_l2_error_of_v_cond_vs_fp32": out}


def teacher_error(num_samples: int = 256, times=(50, 200, 500, 800, 950), first_last_layers_bf16=False) -> dict:
    """Relative L2 error of the shipped toy teacher with --fp8-teacher (and --first-last-layers-bf16 if asked)
    against itself in fp32, on held-out toy videos noised to each time (rectified flow, diffusers' 0..1000
    scale): the conditional velocity, the CFG-2 velocity and its x0 prediction (what DMD regresses to); and
    FP8 weights alone (activations unquantized)."""
    import copy

    import torch

    full, x0, ctx = _toy_teacher_and_videos(num_samples)  # puts the repository on sys.path
    import rcm_megatron.kernels.fp8 as fp8

    quant = copy.deepcopy(full)
    quant.quantize_fp8(*(1, 1) if first_last_layers_bf16 else (0, 0))
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
            t = torch.full((num_samples,), float(tt))
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
    return {"num_samples": num_samples, "first_last_layers_bf16": first_last_layers_bf16, "relative_l2_error_vs_fp32": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--official", nargs="+", required=True, help="evaluate.py JSONs with the official sampler times")
    ap.add_argument("--paper", nargs="*", default=[], help="evaluate.py JSONs with the paper's times (--mid-times 1.3 1.0 0.6)")
    ap.add_argument("--more-official", nargs="*", default=[], help="evaluate.py JSONs of further training seeds (official "
                    "times, both arms): summarized with --official's seeds as official_times_all_seeds")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="", help="how the runs were made (machine, threads)")
    ap.add_argument("--fp8-arm", default="--fp8-teacher", help="the FP8 arm's pretrain_rcm.py flags (recorded; "
                    "--first-last-layers-bf16 in them also sets the teacher error's FP8 teacher)")
    ap.add_argument("--no-teacher-error", action="store_true", help="skip the FP8 toy teacher's own error (about 1 minute)")
    ap.add_argument("--sensitivity", action="store_true", help="also measure where the FP8 error comes from (a few minutes)")
    args = ap.parse_args(argv)
    result = {"setting": "rCM, toy defaults, 300 iterations, EMA weights, 1024 videos per row; arms: full-precision "
                         f"(fp32) teacher and {args.fp8_arm}; same evaluation noise seed", "note": args.note,
              "fp8_arm": args.fp8_arm,
              "official_times": summarize(student_rows(args.official)),
              "sources": {"official": args.official, "paper": args.paper}}
    if args.paper:
        result["paper_times"] = summarize(student_rows(args.paper))
    if args.more_official:
        result["official_times_all_seeds"] = summarize(student_rows(args.official + args.more_official))
        result["sources"]["more_official"] = args.more_official
    if not args.no_teacher_error:
        result["fp8_teacher_error"] = teacher_error(first_last_layers_bf16="--first-last-layers-bf16" in args.fp8_arm)
    if args.sensitivity:
        result["sensitivity"] = sensitivity()
    for times in ("official_times", "paper_times", "official_times_all_seeds"):
        for k, e in result.get(times, {}).get("by_steps", {}).items():
            f = e["fd"]
            print(f"{times:14s} {k} step(s): FD full {f['full_mean']:.3f} +- {f['full_seed_std']:.3f}, "
                  f"fp8 {f['fp8_mean']:.3f} +- {f['fp8_seed_std']:.3f}, mean difference {f['mean_difference']:+.3f} "
                  f"({'within' if f['within_seed_noise'] else 'OUTSIDE'} the seed noise)")
    json.dump(result, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
