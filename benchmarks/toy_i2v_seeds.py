#!/usr/bin/env python
"""The toy image-to-video results over several seeds (docs/quality.md, "Image-to-video" and "Two
experts"): mean and spread of FD and first-frame error of the rCM student against its teacher.

One seed says little on the toy task (a short distillation depends on its data order and noise),
so for each seed s this distills with ``pretrain_rcm.py --seed s`` and evaluates the student's EMA
with one sample seed (``--sample-seed``; ``eval/toy_i2v_benchmark.py``: the held-out first frames,
the starting noise and the reference set are the same for every seed, so the spread is that of the
training seed). The teacher is trained once and reused (``benchmarks/toy_i2v_quality.py --out DIR``
leaves it at DIR/teacher.pt; ``toy_experts_quality.py --out DIR`` leaves the two-expert folder at
DIR/experts); without ``--teacher`` the shipped toy teacher widened to the I2V layout serves
(untrained on the image: a smoke run only). The teacher's rows depend on the teacher and the
evaluation settings alone (deterministic), so ``--teacher-result`` takes them from a recorded result
of the same settings instead of sampling again (the 50-step teacher is most of the CPU time), and
``--student SEED=CKPT`` takes a seed's student from an earlier run of the same settings (the recorded
benchmark run: seed 1234, pretrain_rcm.py's default). A seed whose checkpoint under --out is
complete is not distilled again, so a rerun with more seeds adds only the new ones.

    python benchmarks/toy_i2v_seeds.py --task i2v --teacher DIR/teacher.pt --seeds 0 1 2 --out /tmp/s
    python benchmarks/toy_i2v_seeds.py --task experts --teacher DIR/experts --seeds 0 1 2 --out /tmp/e
    python benchmarks/toy_i2v_seeds.py --task i2v --tiny --seeds 0 1 --out /tmp/t      # CI smoke run

``--expert-init high_noise`` (experts) distills with ``pretrain_rcm.py --expert-init high_noise``:
student and fake score start from the high-noise expert instead of the low-noise one; the
``student_init_4step`` row is then evaluated from the high-noise expert as well (not taken from
``--teacher-result``, which recorded the low-noise start).

Targets (issue 22), per seed and for the means: the 4-step student's first-frame error within 2x the
teacher's and its FD within 2x the teacher's FD. Rows: the teacher (Euler + CFG 2), for two experts
also the student before training (the low-noise expert as a 4-step sampler), and the student's EMA
at 4 steps.
"""

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rcm_megatron.checkpointing.expert_source import EXPERTS_FILE  # noqa: E402
from rcm_megatron.checkpointing.loading import open_model  # noqa: E402
from rcm_megatron.eval.toy_benchmark import SAMPLE_SEED, reference_features  # noqa: E402
from rcm_megatron.eval.toy_i2v_benchmark import evaluate_model, held_out_i2v  # noqa: E402
from rcm_megatron.models import WanExperts  # noqa: E402
from toy_i2v_quality import tool, widen_teacher  # noqa: E402  (the sibling benchmark's helpers)

SETTINGS = {  # i2v: the recorded toy_i2v_quality run's distillation as it ran (45 iterations at micro-batch 16)
    "i2v": dict(distill_iters=45, num_samples=128, num_reference=4096, teacher_steps=50, micro_batch_size=16),
    "experts": dict(distill_iters=30, num_samples=64, num_reference=1024, teacher_steps=25, micro_batch_size=8),
    "tiny": dict(distill_iters=3, num_samples=8, num_reference=64, teacher_steps=3, micro_batch_size=2),  # 1 student update
}
METRICS = ("fd", "first_frame_error", "precision", "coverage")


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def load_teacher(path: str):
    """A model file / checkpoint, or a two-expert folder as a ``WanExperts``."""
    if os.path.isfile(os.path.join(path, EXPERTS_FILE)):
        with open(os.path.join(path, EXPERTS_FILE)) as f:
            spec = json.load(f)
        high, _ = open_model(os.path.join(path, spec["high_noise"]))
        low, _ = open_model(os.path.join(path, spec["low_noise"]))
        return WanExperts(high, low, float(spec["boundary_ratio"])).eval(), low
    model, _ = open_model(path)
    return model.eval(), None


def summarize(per_seed: list[dict]) -> dict:
    """Per row and metric the spread over seeds, the 4-step ratios to the teacher and the targets."""
    rows = sorted({k for r in per_seed for k in r["rows"]})
    out = {"rows": {name: {m: spread([r["rows"][name][m] for r in per_seed]) for m in METRICS} for name in rows}}
    ratios = {"fd_4step_over_teacher": [r["rows"]["rcm_4step"]["fd"] / r["rows"]["teacher"]["fd"] for r in per_seed],
              "first_frame_error_4step_over_teacher": [
                  r["rows"]["rcm_4step"]["first_frame_error"] / max(r["rows"]["teacher"]["first_frame_error"], 1e-12)
                  for r in per_seed]}
    out["ratios"] = {k: spread(v) for k, v in ratios.items()}
    out["targets"] = {
        "fd_met_seeds": sum(v <= 2 for v in ratios["fd_4step_over_teacher"]),
        "first_frame_error_met_seeds": sum(v <= 2 for v in ratios["first_frame_error_4step_over_teacher"]),
        "seeds": len(per_seed),
        "fd_met_mean": out["ratios"]["fd_4step_over_teacher"]["mean"] <= 2,
        "first_frame_error_met_mean": out["ratios"]["first_frame_error_4step_over_teacher"]["mean"] <= 2}
    return out


def recorded_rows(path: str, settings: dict, sample_seed: int, names) -> dict:
    """The rows ``names`` of a recorded result whose evaluation used these settings and sample seed."""
    with open(path) as f:
        rec = json.load(f)
    for key in ("num_samples", "num_reference", "teacher_steps"):
        if rec["settings"].get(key) != settings[key]:
            raise SystemExit(f"toy_i2v_seeds.py: error: --teacher-result {path}: {key} {rec['settings'].get(key)}, "
                             f"these settings have {settings[key]}")
    rows = {}
    for name in names:  # toy_i2v_quality / toy_experts_quality results, or this benchmark's own
        row = rec["per_seed"][0]["rows"][name] if "per_seed" in rec else rec["rows"][name]
        used = rec["sample_seed"] if "per_seed" in rec else row.get("seed", SAMPLE_SEED)
        if used != sample_seed:
            raise SystemExit(f"toy_i2v_seeds.py: error: --teacher-result {path}: row {name} used sample seed "
                             f"{used}, not --sample-seed {sample_seed}")
        rows[name] = {m: row[m] for m in (*METRICS, "steps")}
    return rows


def complete(ckpt: str, iters: int) -> bool:
    marker = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    return os.path.isfile(marker) and int(open(marker).read().strip()) >= iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("i2v", "experts"), required=True)
    p.add_argument("--teacher", default=None, help="the I2V teacher file, or (experts) the two-expert folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (pretrain_rcm.py --seed)")
    p.add_argument("--sample-seed", type=int, default=SAMPLE_SEED, help="evaluation noise, the same for every seed")
    p.add_argument("--student", action="append", default=[], metavar="SEED=CKPT",
                   help="take this seed's student from an earlier run of the same settings (repeatable)")
    p.add_argument("--teacher-result", default=None,
                   help="take the teacher's rows from this recorded result (same evaluation settings)")
    p.add_argument("--expert-init", choices=("low_noise", "high_noise"), default="low_noise",
                   help="experts: the expert that initializes student and fake score (pretrain_rcm.py --expert-init)")
    p.add_argument("--distill-only", action="store_true", help="distill the seeds' students, evaluate nothing")
    p.add_argument("--out", required=True, help="working directory (runs, logs, results JSON)")
    p.add_argument("--tiny", action="store_true", help="a smoke run: few iterations and samples")
    p.add_argument("--result", default=None, help="also write the JSON here (e.g. benchmarks/results/...)")
    args = p.parse_args(argv)
    s = SETTINGS["tiny" if args.tiny else args.task]
    if args.expert_init != "low_noise" and args.task != "experts":
        raise SystemExit(f"toy_i2v_seeds.py: error: --expert-init {args.expert_init} needs --task experts")
    os.makedirs(args.out, exist_ok=True)
    out = lambda *a: os.path.join(args.out, *a)  # noqa: E731
    teacher_path = args.teacher
    if teacher_path is None:
        if args.task != "i2v":
            raise SystemExit("toy_i2v_seeds.py: error: --task experts needs --teacher (a two-expert folder)")
        teacher_path = out("teacher_init.pt")
        widen_teacher(os.path.join(ROOT, "assets", "toy_teacher.pt"), teacher_path)
    if not os.path.exists(teacher_path):
        raise SystemExit(f"toy_i2v_seeds.py: error: --teacher {teacher_path}: no such file or directory")
    given = {}
    for spec in args.student:
        seed, _, path = spec.partition("=")
        if not complete(path, s["distill_iters"]):
            raise SystemExit(f"toy_i2v_seeds.py: error: --student {spec}: no checkpoint of {s['distill_iters']} "
                             "iterations there")
        given[int(seed)] = path
    seeds = list(dict.fromkeys([*given, *args.seeds]))
    common = ["--data", "toy-i2v", "--device", "cpu", "--no-memory-check", "--micro-batch-size",
              str(s["micro_batch_size"]), "--log-interval", "10"]
    ckpts, distill_s = dict(given), {}
    for seed in seeds:
        if seed in given:
            continue
        run = out(f"seed{seed}")
        ckpts[seed] = os.path.join(run, "ckpt")
        if not complete(ckpts[seed], s["distill_iters"]):
            distill_s[seed] = tool(out(f"distill_seed{seed}.log"), "pretrain_rcm.py", "--teacher-checkpoint",
                                   teacher_path, *common, "--seed", str(seed), "--train-iters", str(s["distill_iters"]),
                                   *(["--expert-init", args.expert_init] if args.task == "experts" else []),
                                   "--log-dir", run, "--save", ckpts[seed])
    if args.distill_only:
        return 0
    teacher, low = load_teacher(teacher_path)
    start = teacher.high_noise if args.expert_init == "high_noise" else low  # the student before training
    if (low is not None) != (args.task == "experts"):
        raise SystemExit(f"toy_i2v_seeds.py: error: --teacher {teacher_path} is "
                         f"{'a two-expert folder' if low is not None else 'one model'}; --task {args.task} expects "
                         f"{'one model' if args.task == 'i2v' else 'a two-expert folder'}")
    held = held_out_i2v(s["num_samples"])
    ref = reference_features(s["num_reference"])
    seed_kw = {"seed": args.sample_seed}
    t0 = time.time()
    recorded_start = low is not None and args.expert_init == "low_noise"  # the recorded results' start
    fixed_names = ["teacher", *(["student_init_4step"] if recorded_start else [])]
    if args.teacher_result:
        fixed = recorded_rows(args.teacher_result, s, args.sample_seed, fixed_names)
    else:
        fixed = {"teacher": evaluate_model(teacher, "teacher", held, ref, steps=s["teacher_steps"], cfg_scale=2.0,
                                           **seed_kw)}
    if start is not None and "student_init_4step" not in fixed:
        fixed["student_init_4step"] = evaluate_model(start, "student", held, ref, steps=4, **seed_kw)
    fixed = {k: {m: r[m] for m in (*METRICS, "steps")} for k, r in fixed.items()}
    teacher_s = round(time.time() - t0, 1)
    per_seed = []
    for seed in seeds:
        student, _ = open_model(ckpts[seed], weights="ema")
        t0 = time.time()
        rows = dict(fixed)
        for steps in (4,):
            r = evaluate_model(student, "student", held, ref, steps=steps, **seed_kw)
            rows[f"rcm_{steps}step"] = {m: r[m] for m in (*METRICS, "steps")}
        per_seed.append({"seed": seed, "student": ckpts[seed] if seed in given else f"seed{seed}/ckpt",
                         "distill_s": distill_s.get(seed), "evaluate_s": round(time.time() - t0, 1), "rows": rows})
        print(f"seed {seed}: " + "  ".join(f"{k} FD {v['fd']:.3f} ffe {v['first_frame_error']:.3f}"
                                           for k, v in rows.items()), flush=True)
    result = {"benchmark": f"toy_i2v_seeds ({args.task})", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python benchmarks/toy_i2v_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": "CPU", "settings": s, "sample_seed": args.sample_seed,
              "teacher": os.path.abspath(teacher_path), "teacher_rows_from": args.teacher_result,
              "teacher_evaluate_s": teacher_s,
              "student": (f"one network, initialized from the {args.expert_init.replace('_', '-')} expert "
                          "(fake score likewise)"
                          if low is not None else "one network, initialized from the teacher"),
              **summarize(per_seed), "per_seed": per_seed}
    for path in filter(None, (out("toy_i2v_seeds.json"), args.result)):
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    for name, row in result["rows"].items():
        fd, ffe = row["fd"], row["first_frame_error"]
        print(f"{name:20s} FD {fd['mean']:.3f} +- {fd['std']:.3f}  first-frame error {ffe['mean']:.3f} +- {ffe['std']:.3f}")
    print(json.dumps(result["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
