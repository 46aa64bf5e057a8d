#!/usr/bin/env python
"""GPU smoke test: run this first in every GPU session (one H100/H200: 3-6 minutes per optimizer path).

A fresh machine compiles the blocks first (``--compile-blocks auto``, the default on one GPU): on one
H100 the plain path's run did not finish inside 165 s cold and took 162 s with the compile cache
warm, so each run's ``--timeout`` defaults to 420 s; ``--paths plain`` alone fits a 10-minute call.

Runs ``pretrain_rcm.py`` itself (the trainer's student and critic steps, not a re-implementation)
at Wan-1.3B 480p (latents 16 x 21 x 60 x 104 = 32,760 tokens, text 512, random weights,
synthetic data, bf16, full activation recompute) on both optimizer paths: plain AdamW with fp32
master weights, and megatron-core DDP + distributed optimizer. Each run is 4 iterations with a
student step every 2nd, so iterations 3 (critic) and 4 (student) are measured after warm-up.

It fails (exit 1) when
- a run fails, e.g. a fused-attention fallback inside a training pass (AttentionFallbackError,
  which names the pass, dtype and shape) or out of memory;
- a student step takes longer than its model FLOPs divided by the critic step's model TFLOP/s
  measured in the same run, plus 20% (a student step that stalls is far beyond that);
- model TFLOP/s drops, or peak memory grows, by more than 15% against the last recorded baseline
  on the same card (the newest ``benchmarks/results/gpu_smoke_*.json``; ``--baseline none`` skips).

Writes ``gpu_smoke_<date>_<card>.json`` (card, date, command, versions, per-path rows) into
``--out`` and prints a short table last.

    python benchmarks/gpu_smoke.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as pretrain_rcm.py sets it
sys.path.insert(0, ROOT)

LATENT = ["16", "21", "60", "104"]
MICRO_BATCH = 2  # pretrain_rcm.py's default off the toy task
BASE_FLAGS = ["--model", "wan-1.3b", "--bf16", "--micro-batch-size", str(MICRO_BATCH), "--data", "synthetic", "--latent-shape", *LATENT,
              "--recompute-granularity", "full", "--recompute-num-layers", "1", "--train-iters", "4",
              "--student-update-freq", "2", "--tangent-warmup-iters", "0", "--log-interval", "1"]
PATHS = {"plain": [], "distributed-optimizer": ["--use-distributed-optimizer"]}
STUDENT_SLACK = 1.20  # student step time <= its FLOPs / critic TFLOP/s x this
REGRESSION = 0.15


def card_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def run_path(name: str, extra: list[str], work: str, timeout: float) -> dict:
    log_dir = os.path.join(work, name)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_rcm.py"), *BASE_FLAGS, "--log-dir", log_dir, *extra]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                               else (e.stdout or ""))[-3000:]
    rows = []
    path = os.path.join(log_dir, "metrics.jsonl")
    if os.path.exists(path):
        rows = [json.loads(line) for line in open(path) if line.strip()]
    out = {"path": name, "returncode": rc, "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd[1:]),
           "iterations": rows}
    if rc != 0:
        out["error_tail"] = tail
    return out


def measure(run: dict) -> dict:
    """Last critic and last student iteration of a run: seconds, TFLOP/s, peak memory, the ratio check."""
    rows = run["iterations"]
    last = {ph: next((r for r in reversed(rows) if r.get("phase") == ph), None) for ph in ("critic", "student")}
    m = {"path": run["path"], "ok": run["returncode"] == 0}
    for ph, r in last.items():
        if r is None:
            m["ok"] = False
            continue
        secs = r.get("samples_per_sec") and MICRO_BATCH / r["samples_per_sec"]  # one GPU
        m[f"{ph}_s"] = secs
        m[f"{ph}_tflops"] = r.get("model_tflops_per_gpu")
        m[f"{ph}_peak_gib"] = r.get("mem_peak_allocated_gib")
    if m.get("critic_tflops") and m.get("student_s"):
        student_tflop = m["student_tflops"] * m["student_s"]
        m["student_budget_s"] = student_tflop / m["critic_tflops"] * STUDENT_SLACK
        m["student_within_budget"] = m["student_s"] <= m["student_budget_s"]
        m["ok"] = m["ok"] and m["student_within_budget"]
    return m


def newest_baseline(results_dir: str, card: str, exclude: str | None) -> dict | None:
    files = sorted(glob.glob(os.path.join(results_dir, "gpu_smoke_*.json")))
    for f in reversed(files):
        if exclude and os.path.abspath(f) == os.path.abspath(exclude):
            continue
        d = json.load(open(f))
        if d.get("card") == card and all(m.get("ok") for m in d.get("measured", [])):
            return d | {"file": os.path.relpath(f, ROOT)}
    return None


def regressions(measured: list[dict], base: dict) -> list[str]:
    found = []
    base_by_path = {m["path"]: m for m in base.get("measured", [])}
    for m in measured:
        b = base_by_path.get(m["path"])
        if not b:
            continue
        for ph in ("critic", "student"):
            now, then = m.get(f"{ph}_tflops"), b.get(f"{ph}_tflops")
            if now and then and now < then * (1 - REGRESSION):
                found.append(f"{m['path']} {ph}: {now:.0f} model TFLOP/s vs {then:.0f} in {base['file']}")
            now, then = m.get(f"{ph}_peak_gib"), b.get(f"{ph}_peak_gib")
            if now and then and now > then * (1 + REGRESSION):
                found.append(f"{m['path']} {ph}: peak {now:.1f} GiB vs {then:.1f} GiB in {base['file']}")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the JSON")
    ap.add_argument("--work", default="/tmp/gpu_smoke", help="log folders of the runs")
    ap.add_argument("--baseline", default="auto", help="'auto' (newest gpu_smoke_*.json on this card), a path, or 'none'")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds per run (a cold start compiles the blocks)")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    env_ok = {"PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "")}
    runs = [run_path(p, PATHS[p], args.work, args.timeout) for p in args.paths]
    measured = [measure(r) for r in runs]
    now = _dt.datetime.now(_dt.timezone.utc)
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"gpu_smoke_{now:%Y%m%dT%H%M%SZ}_{card_slug(card)}.json")
    base = None
    if args.baseline == "auto":
        base = newest_baseline(args.out, card, out_path)
    elif args.baseline != "none":
        base = json.load(open(args.baseline)) | {"file": args.baseline}
    found = regressions(measured, base) if base else []
    import triton

    result = {"card": card, "date": now.isoformat(), "command": "python " + " ".join(sys.argv),
              "torch": torch.__version__, "triton": triton.__version__, "env": env_ok,
              "settings": " ".join(BASE_FLAGS), "student_slack": STUDENT_SLACK, "regression_limit": REGRESSION,
              "baseline": base["file"] if base else None, "regressions": found, "measured": measured, "runs": runs}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"gpu_smoke on {card}, torch {torch.__version__}; results {os.path.relpath(out_path, ROOT)}")
    for r in runs:
        if r["returncode"] != 0:
            print(f"--- {r['path']} failed ({r['returncode']}):\n{r.get('error_tail', '')}")
    print(f"{'path':24s} {'critic s':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s} {'student s':>10s} {'TFLOP/s':>8s} "
          f"{'budget s':>9s} {'peak GiB':>9s}  ok")
    for m in measured:
        f = lambda k, spec: format(m[k], spec) if m.get(k) is not None else "-"  # noqa: E731
        print(f"{m['path']:24s} {f('critic_s', '9.2f')} {f('critic_tflops', '8.0f')} {f('critic_peak_gib', '9.1f')} "
              f"{f('student_s', '10.2f')} {f('student_tflops', '8.0f')} {f('student_budget_s', '9.2f')} "
              f"{f('student_peak_gib', '9.1f')}  {m['ok']}")
    print(f"baseline: {result['baseline'] or 'none'}; regressions > {REGRESSION:.0%}: {found or 'none'}")
    ok = all(m["ok"] for m in measured) and not found
    print("gpu_smoke:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
