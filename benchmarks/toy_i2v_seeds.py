#!/usr/bin/env python
"""The toy image-to-video results over several seeds (docs/quality.md, "Image-to-video" and "Two
experts"): mean and spread of FD and first-frame error of the rCM student against its teacher.

One seed says little on the toy task (128 or 64 generated videos give a noisy FD, and a short
distillation depends on its data order and noise), so for each seed s this reruns the distillation
with ``pretrain_rcm.py --seed s`` and evaluates teacher and student with sample noise keyed by s
(``eval/toy_i2v_benchmark.py``; the held-out first frames and the reference set stay fixed, so the
teacher's spread is its sampling noise alone). The teacher is trained once and reused
(``benchmarks/toy_i2v_quality.py --out DIR`` leaves it at DIR/teacher.pt; ``toy_experts_quality.py
--out DIR`` leaves the two-expert folder at DIR/experts); without ``--teacher`` the shipped toy teacher
widened to the I2V layout serves (untrained on the image: a smoke run only).

    python benchmarks/toy_i2v_seeds.py --task i2v --teacher DIR/teacher.pt --seeds 0 1 2 --out /tmp/s
    python benchmarks/toy_i2v_seeds.py --task experts --teacher DIR/experts --seeds 0 1 2 --out /tmp/e
    python benchmarks/toy_i2v_seeds.py --task i2v --tiny --seeds 0 1 --out /tmp/t      # CI smoke run

Targets (issue 22), per seed and for the means: the 4-step student's first-frame error within 2x the
teacher's and its FD within 2x the teacher's FD. Rows: the teacher (Euler + CFG 2), for two experts
also the student before training (the low-noise expert as a 4-step sampler), and the student's EMA
at 4 steps (and 1, 2 with ``--all-steps``).
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
    "tiny": dict(distill_iters=2, num_samples=8, num_reference=64, teacher_steps=3, micro_batch_size=2),
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("i2v", "experts"), required=True)
    p.add_argument("--teacher", default=None, help="the I2V teacher file, or (experts) the two-expert folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True, help="working directory (runs, logs, results JSON)")
    p.add_argument("--tiny", action="store_true", help="a smoke run: few iterations and samples")
    p.add_argument("--all-steps", action="store_true", help="also evaluate the student at 1 and 2 steps")
    p.add_argument("--result", default=None, help="also write the JSON here (e.g. benchmarks/results/...)")
    args = p.parse_args(argv)
    s = SETTINGS["tiny" if args.tiny else args.task]
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
    teacher, low = load_teacher(teacher_path)
    if (low is not None) != (args.task == "experts"):
        raise SystemExit(f"toy_i2v_seeds.py: error: --teacher {teacher_path} is "
                         f"{'a two-expert folder' if low is not None else 'one model'}; --task {args.task} expects "
                         f"{'one model' if args.task == 'i2v' else 'a two-expert folder'}")
    held = held_out_i2v(s["num_samples"])
    ref = reference_features(s["num_reference"])
    common = ["--data", "toy-i2v", "--device", "cpu", "--no-memory-check", "--micro-batch-size",
              str(s["micro_batch_size"]), "--log-interval", "10"]
    per_seed = []
    for seed in args.seeds:
        run = out(f"seed{seed}")
        distill_s = tool(out(f"distill_seed{seed}.log"), "pretrain_rcm.py", "--teacher-checkpoint", teacher_path,
                         *common, "--seed", str(seed), "--train-iters", str(s["distill_iters"]), "--log-dir", run,
                         "--save", os.path.join(run, "ckpt"))
        student, _ = open_model(os.path.join(run, "ckpt"), weights="ema")
        sample_seed = SAMPLE_SEED + seed
        t0 = time.time()
        rows = {"teacher": evaluate_model(teacher, "teacher", held, ref, steps=s["teacher_steps"], cfg_scale=2.0,
                                          seed=sample_seed)}
        if low is not None:
            rows["student_init_4step"] = evaluate_model(low, "student", held, ref, steps=4, seed=sample_seed)
        for steps in ((1, 2, 4) if args.all_steps else (4,)):
            rows[f"rcm_{steps}step"] = evaluate_model(student, "student", held, ref, steps=steps, seed=sample_seed)
        per_seed.append({"seed": seed, "sample_seed": sample_seed, "distill_s": distill_s,
                         "evaluate_s": round(time.time() - t0, 1),
                         "rows": {k: {m: r[m] for m in (*METRICS, "steps")} for k, r in rows.items()}})
        r = per_seed[-1]["rows"]
        print(f"seed {seed}: " + "  ".join(f"{k} FD {v['fd']:.3f} ffe {v['first_frame_error']:.3f}"
                                           for k, v in r.items()), flush=True)
    result = {"benchmark": f"toy_i2v_seeds ({args.task})", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python benchmarks/toy_i2v_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": "CPU", "settings": s, "teacher": os.path.abspath(teacher_path),
              "student": ("one network, initialized from the low-noise expert (fake score likewise)"
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
