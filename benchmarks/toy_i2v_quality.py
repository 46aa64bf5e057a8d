#!/usr/bin/env python
"""Toy image-to-video quality (docs/quality.md, "Image-to-video"): does an rCM-distilled I2V
student keep the given first frame and match its teacher's quality?

Every stage runs the real tools (pretrain_rcm.py, tools/export_teacher.py), on CPU in minutes:
1. the I2V teacher: the shipped toy teacher widened to the channel-concat I2V layout of Wan2.1 /
   Wan2.2 I2V (in_channels 4 noisy + 4 mask + 4 condition; the new input channels start at zero
   weight, so it starts as the T2V teacher), then flow-matching fine-tuned on --data toy-i2v
   (``pretrain_rcm.py --mode teacher``; keeping the first frame is learned, not built in);
2. rCM distillation of that teacher on --data toy-i2v;
3. evaluation (eval/toy_i2v_benchmark.py): one video per held-out first frame, the teacher with 50
   Euler steps and CFG 2, the student's EMA at 1, 2 and 4 steps; FD and the toy metrics against
   the held-out reference, and the first-frame error.

    python benchmarks/toy_i2v_quality.py --out /tmp/toy_i2v            # the recorded run
    python benchmarks/toy_i2v_quality.py --out /tmp/t --tiny           # a smoke run (CI, seconds)

Targets (issue 22): at 4 steps the student's first-frame error within 2x the teacher's and its FD
within 2x the teacher's 50-step FD. The JSON records settings, timings and whether they are met.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rcm_megatron.checkpointing.loading import open_model, read_model_source  # noqa: E402
from rcm_megatron.checkpointing.model_file import save_model_file  # noqa: E402
from rcm_megatron.eval.toy_benchmark import reference_features  # noqa: E402
from rcm_megatron.eval.toy_i2v_benchmark import evaluate_model, held_out_i2v  # noqa: E402

SETTINGS = {"full": dict(teacher_iters=150, distill_iters=120, num_samples=128, num_reference=4096,
                         teacher_steps=50, micro_batch_size=16),
            "tiny": dict(teacher_iters=4, distill_iters=4, num_samples=8, num_reference=64, teacher_steps=4,
                         micro_batch_size=4)}
MASK_CHANNELS = 4


def widen_teacher(src: str, dst: str) -> None:
    """The T2V teacher with condition channels (mask + latents) whose input weights are zero."""
    cfg, sd, _ = read_model_source(src)
    extra = MASK_CHANNELS + cfg.out_channels
    w = sd["patch_embedding.proj.weight"]
    sd["patch_embedding.proj.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
    save_model_file(dst, cfg.replace(in_channels=cfg.in_channels + extra).to_dict(), sd,
                    {"derived_from": os.path.relpath(src, ROOT), "widened_for": "channel-concat I2V"})


def tool(log: str, *args) -> float:
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {p.returncode}); see {log}")
    return round(time.time() - t0, 1)


def iterations_done(metrics: str) -> int:
    with open(metrics) as f:
        return sum(1 for line in f if line.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working directory (runs, logs, model files, results JSON)")
    p.add_argument("--tiny", action="store_true", help="a smoke run: few iterations and samples")
    p.add_argument("--result", default=None, help="also write the JSON here (e.g. benchmarks/results/...)")
    args = p.parse_args(argv)
    s = SETTINGS["tiny" if args.tiny else "full"]
    os.makedirs(args.out, exist_ok=True)
    out = lambda *a: os.path.join(args.out, *a)  # noqa: E731
    mbs = str(s["micro_batch_size"])
    common = ["--data", "toy-i2v", "--device", "cpu", "--no-memory-check", "--micro-batch-size", mbs,
              "--log-interval", "50"]
    timings = {}
    widen_teacher(os.path.join(ROOT, "assets", "toy_teacher.pt"), out("teacher_init.pt"))
    timings["teacher_finetune_s"] = tool(out("teacher.log"), "pretrain_rcm.py", "--mode", "teacher",
                                         "--teacher-checkpoint", out("teacher_init.pt"), *common,
                                         "--train-iters", str(s["teacher_iters"]), "--teacher-lr", "1e-3",
                                         "--log-dir", out("teacher"), "--save", out("teacher", "ckpt"))
    tool(out("export_teacher.log"), "tools/export_teacher.py", out("teacher", "ckpt"), out("teacher.pt"))
    timings["distill_s"] = tool(out("distill.log"), "pretrain_rcm.py", "--teacher-checkpoint", out("teacher.pt"),
                                *common, "--train-iters", str(s["distill_iters"]), "--log-dir", out("student"),
                                "--save", out("student", "ckpt"))
    teacher, _ = open_model(out("teacher.pt"))
    student, _ = open_model(out("student", "ckpt"), weights="ema")
    held = held_out_i2v(s["num_samples"])
    ref = reference_features(s["num_reference"])
    rows = {"teacher": evaluate_model(teacher, "teacher", held, ref, steps=s["teacher_steps"], cfg_scale=2.0)}
    for steps in (1, 2, 4):
        rows[f"rcm_{steps}step"] = evaluate_model(student, "student", held, ref, steps=steps)
    t, st4 = rows["teacher"], rows["rcm_4step"]
    result = {
        "benchmark": "toy_i2v_quality", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/toy_i2v_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": "cpu", "settings": s, "timings": timings, "layout": "concat (mask 4 + condition 4)",
        "distill_iters_done": iterations_done(out("student", "metrics.jsonl")),  # fewer if stopped by SIGTERM
        "rows": rows,
        "targets": {"first_frame_error_4step_over_teacher": st4["first_frame_error"] / max(t["first_frame_error"], 1e-12),
                    "fd_4step_over_teacher": st4["fd"] / t["fd"],
                    "first_frame_error_met": st4["first_frame_error"] <= 2 * t["first_frame_error"],
                    "fd_met": st4["fd"] <= 2 * t["fd"]},
    }
    for path in filter(None, (out("toy_i2v_quality.json"), args.result)):
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    for name, r in rows.items():
        print(f"{name:12s} steps {r['steps']:2d}  FD {r['fd']:.3f}  first-frame error {r['first_frame_error']:.4f}  "
              f"precision {r['precision']:.2f}")
    print(json.dumps(result["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
