#!/usr/bin/env python
"""Quality and diversity of a teacher and distilled students on the toy video task.

    python tools/evaluate.py --teacher assets/toy_teacher.pt \\
        --student scm=runs/scm/checkpoints --student dmd=runs/dmd/checkpoints --student rcm=runs/rcm/checkpoints \\
        --out benchmarks/results/toy_quality

Samples the teacher with ``--teacher-steps`` Euler steps and classifier-free guidance
``--cfg-scale`` and every student with 1, 2 and 4 steps (rcm_megatron.rcm.sampling.sample),
``--num-samples`` videos each (classes balanced), and compares them with held-out toy data
in the fixed analytic feature space of rcm_megatron/eval/toy_features.py: Frechet distance
(per class, averaged), mode coverage, precision and within-class diversity (definitions in
rcm_megatron/eval/metrics.py). Writes OUT.json (everything, per class too) and OUT.png
(bar charts and sample videos) and prints a markdown table. Also reported: held-out data
vs the reference (the noise floor of each metric at this sample count) and the *untrained*
student (the teacher's weights sampled in N steps, where every distillation starts).
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcm_megatron.cli import ArgumentParser, quiet_optional_backends  # noqa: E402

quiet_optional_backends()  # before anything imports megatron-core

import torch  # noqa: E402

from rcm_megatron.checkpointing.dist_source import TRAIN_WEIGHTS  # noqa: E402
from rcm_megatron.checkpointing.loading import open_model  # noqa: E402
from rcm_megatron.eval.toy_benchmark import (HELD_OUT_SEED, SAMPLE_SEED, data_floor, evaluate_model,  # noqa: E402
                                             generate, reference_features)

DEFAULT_TEACHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy_teacher.pt")
SUMMARY = ("fd", "coverage", "precision", "mode_entropy", "diversity")


def _student_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a checkpoint dir or model file), got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher model file (default: assets/toy_teacher.pt)")
    p.add_argument("--student", type=_student_arg, action="append", default=[], metavar="NAME=PATH",
                   help="a distilled student: training checkpoint dir (--save) or model file; repeatable")
    p.add_argument("--weights", choices=TRAIN_WEIGHTS, default="ema", help="student weights from checkpoints (default ema)")
    p.add_argument("--iteration", type=int, default=None,
                   help="checkpoint iteration of every checkpoint-dir student (default: the latest committed)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student sampling steps")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="teacher guidance (default: the toy distillation default, rcm_megatron.training.arguments)")
    p.add_argument("--teacher-shift", type=float, default=3.0, help="shift of the teacher's Euler time grid")
    p.add_argument("--sigma-max", type=float, default=80.0, help="student sampler's first time atan(sigma_max)")
    p.add_argument("--mid-times", type=float, nargs="+", default=None, help="student sampler's intermediate times")
    p.add_argument("--num-samples", type=int, default=1024, help="generated videos per model and step count")
    p.add_argument("--num-reference", type=int, default=4096, help="held-out data videos")
    p.add_argument("--seed", type=int, default=SAMPLE_SEED, help="sampling noise seed")
    p.add_argument("--batch-size", type=int, default=512,
                   help="samples per forward, one progress line each (other sizes agree to float32 rounding)")
    p.add_argument("--skip-teacher", action="store_true", help="do not sample the teacher (quick student checks)")
    p.add_argument("--teacher-from", default=None, metavar="JSON",
                   help="reuse the teacher's metrics from an earlier OUT.json with the same teacher settings")
    p.add_argument("--skip-untrained", action="store_true", help="do not evaluate the untrained student")
    p.add_argument("--out", default="runs/evaluate/toy_quality", help="output prefix: OUT.json and OUT.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only redraw OUT.png from an earlier OUT.json (samples regenerated from its models)")
    return p


class Usage(Exception):
    """Bad input, found before any sampling: one line, exit 2."""


def validate(args) -> tuple[object, dict]:
    """Check every option and open every model (teacher and --student; all small toy models) before
    any sampling, so a wrong path or option fails in seconds. Returns (teacher or None, {name: student})."""
    from rcm_megatron.rcm.sampling import OFFICIAL_MID_TIMES

    for flag in ("num_samples", "num_reference", "teacher_steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise Usage(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    mid = tuple(args.mid_times) if args.mid_times else OFFICIAL_MID_TIMES
    if any(not 1 <= s <= len(mid) + 1 for s in args.steps):
        raise Usage(f"--steps {' '.join(map(str, args.steps))}: expected 1..{len(mid) + 1} (one more than the mid times)")
    if any(not 0 < t < math.pi / 2 for t in mid) or list(mid) != sorted(mid, reverse=True):
        raise Usage(f"--mid-times {list(mid)}: expected decreasing TrigFlow times in (0, pi/2)")
    if not (math.isfinite(args.sigma_max) and args.sigma_max > 0):
        raise Usage(f"--sigma-max must be a finite number > 0, got {args.sigma_max}")
    if not math.isfinite(args.cfg_scale):
        raise Usage(f"--cfg-scale must be finite, got {args.cfg_scale}")
    names = [name for name, _ in args.student]
    if len(set(names)) != len(names):
        raise Usage(f"--student: the name {next(n for n in names if names.count(n) > 1)!r} is given twice")
    for name, path in args.student:
        if not os.path.exists(path):
            raise Usage(f"--student {name}={path}: no such checkpoint directory or model file")
    if args.teacher_from:
        try:
            with open(args.teacher_from) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            raise Usage(f"--teacher-from {args.teacher_from}: not a readable results JSON ({e})") from None
    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise Usage(f"--out {args.out}: cannot create {out_dir} ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise Usage(f"--out {args.out}: {out_dir} is not writable")
    teacher = None
    if os.path.exists(args.teacher):
        teacher = _open(f"--teacher {args.teacher}", args.teacher)[0]
    elif not args.skip_teacher or not args.skip_untrained:
        raise Usage(f"--teacher {args.teacher}: no such file")
    students = {}
    for name, path in args.student:
        model, meta = _open(f"--student {name}={path}", path, weights=args.weights,
                            iteration=args.iteration if os.path.isdir(path) else None)
        if teacher is not None and (model.config.in_channels, model.config.text_dim) != (teacher.config.in_channels,
                                                                                     teacher.config.text_dim):
            raise Usage(f"--student {name}={path}: in_channels/text_dim {model.config.in_channels}/{model.config.text_dim} "
                        f"differ from the teacher's {teacher.config.in_channels}/{teacher.config.text_dim}")
        students[name] = (model, meta)
    return teacher, students


def _open(what: str, path: str, **kw):
    from rcm_megatron.checkpointing.errors import CheckpointError

    try:
        return open_model(path, **kw)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        raise Usage(f"{what}: {e}") from None


def progress_printer(label: str):
    """``progress(done, total)`` printing one plain line per batch: counts, elapsed time and ETA."""
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        el = time.perf_counter() - t0
        eta = el / done * (total - done)
        print(f"  {label}: {done}/{total} samples, {el:.1f} s, ETA {eta:.0f} s", flush=True)
    return progress


def _summary(r: dict) -> dict:
    return {k: round(r[k], 4) for k in SUMMARY}


def markdown_table(results: dict) -> str:
    lines = ["| model | steps | FD | coverage | precision | mode entropy | diversity |",
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def row(name, r):
        lines.append(f"| {name} | {r['steps']} | {r['fd']:.4f} | {r['coverage']:.3f} | {r['precision']:.3f} | "
                     f"{r['mode_entropy']:.3f} | {r['diversity']:.3f} |")
    if "data" in results:
        row("held-out data (floor)", results["data"])
    if "teacher" in results:
        row(f"teacher (Euler, CFG {results['teacher']['cfg_scale']})", results["teacher"])
    for s, r in sorted(results.get("untrained", {}).items(), key=lambda kv: int(kv[0])):
        row("untrained student", r)
    for m, per in results["methods"].items():
        for s, r in sorted(per.items(), key=lambda kv: int(kv[0])):
            row(m, r)
    return "\n".join(lines)


def _sample_rows(teacher, students: dict, steps: list, settings: dict) -> dict:
    """4 videos (one per class) from the teacher and each student at its fewest and most steps."""
    rows = {}
    skw = {"sigma_max": settings["sigma_max"], "mid_times": settings["mid_times"], "seed": settings["seed"]}
    if teacher is not None:
        rows[f"TEACHER {settings['teacher_steps']}"] = generate(
            teacher, "teacher", 4, steps=settings["teacher_steps"], cfg_scale=settings["cfg_scale"],
            shift=settings["teacher_shift"], seed=settings["seed"])[0]
    for name, model in students.items():
        for s in (min(steps), max(steps)):
            rows[f"{name.upper()} {s} STEP" + ("S" if s > 1 else "")] = generate(model, "student", 4, steps=s, **skw)[0]
    return rows


def replot(path: str, out: str) -> int:
    from rcm_megatron.eval.plot import plot_benchmark

    with open(path) as f:
        results = json.load(f)
    settings = results["settings"]
    teacher, _ = open_model(settings["teacher"])
    students = {name: open_model(results["students"][name]["path"], weights=settings["weights"],
                                 iteration=settings.get("iteration") if os.path.isdir(results["students"][name]["path"])
                                 else None)[0]
                for name in results["methods"]}
    rows = _sample_rows(teacher, students, settings["steps"], settings)
    plot_benchmark(results, rows, out + ".png", TITLE)
    print(f"wrote {out}.png")
    return 0


TITLE = "TOY VIDEO TASK: FEW-STEP STUDENTS VS THE TEACHER"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        return replot(args.replot, args.out)
    if args.cfg_scale is None:
        from rcm_megatron.training.arguments import TOY_DEFAULTS

        args.cfg_scale = TOY_DEFAULTS["cfg_scale"]
    try:
        teacher, students = validate(args)
    except Usage as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t_start = time.perf_counter()
    ref = reference_features(args.num_reference, HELD_OUT_SEED)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "student"},
               "students": dict(args.student), "methods": {}, "untrained": {},
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    results["data"] = data_floor(args.num_samples, ref)
    samples = {}
    skw = {"sigma_max": args.sigma_max, "mid_times": args.mid_times, "seed": args.seed}
    if args.teacher_from:
        with open(args.teacher_from) as f:
            old = json.load(f)
        keys = ("teacher", "teacher_steps", "cfg_scale", "teacher_shift", "num_samples", "num_reference", "seed")
        def same(k):
            a, b = old["settings"].get(k), getattr(args, k)
            return os.path.realpath(a) == os.path.realpath(b) if k == "teacher" and a and b else a == b
        if "teacher" not in old or not all(same(k) for k in keys):
            print(f"evaluate.py: error: --teacher-from {args.teacher_from}: no teacher results with these settings "
                  f"({', '.join(keys)})", file=sys.stderr)
            return 2
        results["teacher"] = old["teacher"]
        samples[f"TEACHER {args.teacher_steps}"] = generate(teacher, "teacher", 4, steps=args.teacher_steps,
                                                            cfg_scale=args.cfg_scale, shift=args.teacher_shift,
                                                            seed=args.seed)[0]
    elif not args.skip_teacher:
        r = evaluate_model(teacher, "teacher", ref, args.num_samples, steps=args.teacher_steps,
                           cfg_scale=args.cfg_scale, shift=args.teacher_shift, seed=args.seed,
                           batch_size=args.batch_size, progress=progress_printer(f"teacher {args.teacher_steps} steps"))
        results["teacher"] = r
        print(f"teacher {args.teacher_steps} steps: {_summary(r)} ({r['seconds']} s)", flush=True)
        samples[f"TEACHER {args.teacher_steps}"] = generate(teacher, "teacher", 4, steps=args.teacher_steps,
                                                            cfg_scale=args.cfg_scale, shift=args.teacher_shift,
                                                            seed=args.seed)[0]
    if not args.skip_untrained:
        for s in args.steps:
            r = evaluate_model(teacher, "student", ref, args.num_samples, steps=s, batch_size=args.batch_size,
                               progress=progress_printer(f"untrained student {s} step(s)"), **skw)
            results["untrained"][str(s)] = r
            print(f"untrained student {s} step(s): {_summary(r)}", flush=True)
    for name, path in args.student:
        student, meta = students.pop(name)
        results["methods"][name] = {}
        results["students"][name] = {"path": path, **{k: v for k, v in meta.items() if k != "teacher"}}
        for s in args.steps:
            r = evaluate_model(student, "student", ref, args.num_samples, steps=s, batch_size=args.batch_size,
                               progress=progress_printer(f"{name} {s} step(s)"), **skw)
            results["methods"][name][str(s)] = r
            print(f"{name} {s} step(s): {_summary(r)} ({r['seconds']} s)", flush=True)
            if s in (min(args.steps), max(args.steps)):
                samples[f"{name.upper()} {s} STEP" + ("S" if s > 1 else "")] = generate(
                    student, "student", 4, steps=s, **skw)[0]
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    table = markdown_table(results)
    print(table)
    if not args.no_plot and results["methods"] and "teacher" in results:
        from rcm_megatron.eval.plot import plot_benchmark

        plot_benchmark(results, samples, args.out + ".png", TITLE)
        print(f"wrote {args.out}.json and {args.out}.png")
    else:
        print(f"wrote {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
