#!/usr/bin/env python
"""Toy two-expert (Wan2.2 A14B-style) distillation (docs/quality.md, "Two-expert teacher"): one
student network, initialized from the low-noise expert, distilled by rCM from a teacher whose calls
pick their expert by time against the boundary.

Every stage runs the real tools, on CPU in minutes:
1. the two experts: the high-noise expert is the toy I2V teacher (``benchmarks/toy_i2v_quality.py
   --out DIR`` leaves it at DIR/teacher.pt); the low-noise expert is that teacher fine-tuned further
   by flow matching on --data toy-i2v with another seed (``pretrain_rcm.py --mode teacher``; its
   checkpoint folder is the low_noise/ expert, its EMA the weights), boundary 0.9 (Wan2.2 I2V A14B);
2. rCM distillation: ``pretrain_rcm.py --teacher-checkpoint EXPERTS_DIR --data toy-i2v``;
3. evaluation (eval/toy_i2v_benchmark.py): the two-expert teacher with Euler + CFG 2, the student
   before training (the low-noise expert used as a few-step sampler) and the student's EMA at 1, 2
   and 4 steps; FD and first-frame error against the same held-out set.

    python benchmarks/toy_experts_quality.py --teacher /tmp/toy_i2v/teacher.pt --out /tmp/experts
    python benchmarks/toy_experts_quality.py --teacher T.pt --out /tmp/e --tiny     # smoke run
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rcm_megatron.checkpointing.expert_source import EXPERTS_FILE  # noqa: E402
from rcm_megatron.checkpointing.loading import open_model, open_source  # noqa: E402
from rcm_megatron.checkpointing.model_writer import write_model_checkpoint  # noqa: E402
from rcm_megatron.eval.toy_benchmark import reference_features  # noqa: E402
from rcm_megatron.eval.toy_i2v_benchmark import evaluate_model, held_out_i2v  # noqa: E402
from rcm_megatron.models import WanExperts  # noqa: E402
from toy_i2v_quality import tool  # noqa: E402  (the sibling benchmark's subprocess runner)

SETTINGS = {"full": dict(low_noise_iters=20, distill_iters=30, num_samples=64, num_reference=1024,
                         teacher_steps=25, micro_batch_size=8),
            "tiny": dict(low_noise_iters=2, distill_iters=2, num_samples=8, num_reference=64, teacher_steps=4,
                         micro_batch_size=2)}
BOUNDARY = 0.9  # Wan2.2 I2V A14B


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the toy I2V teacher file (toy_i2v_quality.py's DIR/teacher.pt)")
    p.add_argument("--out", required=True, help="working directory (runs, logs, experts, results JSON)")
    p.add_argument("--tiny", action="store_true", help="a smoke run: few iterations and samples")
    p.add_argument("--result", default=None, help="also write the JSON here (e.g. benchmarks/results/...)")
    args = p.parse_args(argv)
    s = SETTINGS["tiny" if args.tiny else "full"]
    os.makedirs(args.out, exist_ok=True)
    out = lambda *a: os.path.join(args.out, *a)  # noqa: E731
    common = ["--data", "toy-i2v", "--device", "cpu", "--no-memory-check", "--micro-batch-size",
              str(s["micro_batch_size"]), "--log-interval", "10"]
    experts = out("experts")
    timings = {"low_noise_finetune_s": tool(
        out("low_noise.log"), "pretrain_rcm.py", "--mode", "teacher", "--teacher-checkpoint", args.teacher, *common,
        "--train-iters", str(s["low_noise_iters"]), "--teacher-lr", "1e-3", "--seed", "1",
        "--log-dir", out("low_noise_run"), "--save", os.path.join(experts, "low_noise"))}
    with open_source(args.teacher) as src:
        write_model_checkpoint(os.path.join(experts, "high_noise"), src, torch.float32, overwrite=True)
    with open(os.path.join(experts, EXPERTS_FILE), "w") as f:
        json.dump({"boundary_ratio": BOUNDARY, "high_noise": "high_noise", "low_noise": "low_noise",
                   "source": "toy I2V teacher (high) + its flow-matching fine-tune (low)"}, f, indent=1)
    timings["distill_s"] = tool(out("distill.log"), "pretrain_rcm.py", "--teacher-checkpoint", experts, *common,
                                "--train-iters", str(s["distill_iters"]), "--log-dir", out("student"),
                                "--save", out("student", "ckpt"))
    high, _ = open_model(os.path.join(experts, "high_noise"))
    low, _ = open_model(os.path.join(experts, "low_noise"))
    teacher = WanExperts(high, low, BOUNDARY).eval()
    student, _ = open_model(out("student", "ckpt"), weights="ema")
    held = held_out_i2v(s["num_samples"])
    ref = reference_features(s["num_reference"])
    rows = {"teacher": evaluate_model(teacher, "teacher", held, ref, steps=s["teacher_steps"], cfg_scale=2.0),
            "high_noise_expert_alone": evaluate_model(high, "teacher", held, ref, steps=s["teacher_steps"],
                                                      cfg_scale=2.0),
            "student_init_4step": evaluate_model(low, "student", held, ref, steps=4)}
    for steps in (1, 2, 4):
        rows[f"rcm_{steps}step"] = evaluate_model(student, "student", held, ref, steps=steps)
    t = rows["teacher"]
    result = {"benchmark": "toy_experts_quality", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python benchmarks/toy_experts_quality.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:]),
              "device": "cpu", "settings": s, "timings": timings, "boundary_ratio": BOUNDARY,
              "student": "one network, initialized from the low-noise expert (fake score likewise)",
              "summary": {k: {"fd": r["fd"], "fd_over_teacher": r["fd"] / t["fd"],
                              "first_frame_error": r["first_frame_error"], "steps": r["steps"]}
                          for k, r in rows.items()},
              "rows": rows}
    for path in filter(None, (out("toy_experts_quality.json"), args.result)):
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    for name, r in rows.items():
        print(f"{name:24s} steps {r['steps']:2d}  FD {r['fd']:.3f} ({r['fd'] / t['fd']:.2f}x teacher)  "
              f"first-frame error {r['first_frame_error']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
