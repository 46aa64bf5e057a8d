#!/usr/bin/env python
"""Activation recompute of the with-grad passes: time and memory of each choice, on one GPU.

A with-grad forward and its backward (what the student's sCM / DMD steps and the critic's step run
per micro-batch) through ``--layers`` blocks of Wan-1.3B at 480p (32,760 tokens, text 512, fp32
weights under bf16 autocast, as the trainer runs them), under each recompute choice of
``--recompute-granularity`` (``models/recompute.py``): ``full`` (Megatron-LM's
``--recompute-num-layers 1``), ``selective`` (keep GEMM and attention outputs, recompute the
elementwise work), ``selective`` + ``--recompute-modules core_attn``, and none; eager, and with
compiled blocks (``--compile-blocks``) for full and none (selective keeps eager blocks: its op policy
runs in eager code). Reports the pass's time and the activation memory it holds at its peak (peak
allocated minus what was allocated before the forward and minus the parameters' gradients; the
embedding and head are in it too), per block and sample, and the ratios to
``full``, the trainer's default. Nothing here is a re-implementation: it calls ``WanDiT`` with the
trainer's ``RecomputeConfig``.

Writes ``recompute_<date>_<card>.json`` (card, date, command, versions) and prints a table last.
About 2 minutes on one H100/H200 at the defaults.

    python benchmarks/recompute.py --out benchmarks/results [--layers 4] [--micro-batch 2]
    python benchmarks/recompute.py --tiny --out /tmp/recompute   # CPU: the tiny model (a test of this script)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as pretrain_rcm.py sets it
sys.path.insert(0, ROOT)

CHOICES = [  # (label, granularity, modules, compiled)
    ("full", "full", (), False),
    ("selective", "selective", (), False),
    ("selective + core_attn", "selective", ("core_attn",), False),
    ("none", None, (), False),
    ("full, compiled", "full", (), True),
    ("none, compiled", None, (), True),
]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--layers", type=int, default=4, help="blocks of Wan-1.3B in the pass (>= 1)")
    ap.add_argument("--micro-batch", type=int, default=2, help="samples per pass (the trainer's default: 2)")
    ap.add_argument("--reps", type=int, default=3, help="timed passes per choice, after one warm-up")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on CPU (a test of this script, no timing value)")
    args = ap.parse_args(argv)
    for flag, value in (("--layers", args.layers), ("--micro-batch", args.micro_batch), ("--reps", args.reps)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from rcm_megatron.models import WanDiT, preset
    from rcm_megatron.models.recompute import RecomputeConfig

    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    cfg = preset("tiny" if args.tiny else "wan-1.3b").replace(num_layers=args.layers)
    latent, text_len = ((16, 2, 4, 6), 16) if args.tiny else ((16, 21, 60, 104), 512)
    tokens = latent[1] * latent[2] * latent[3] // 4
    torch.manual_seed(0)
    x = torch.randn(args.micro_batch, *latent, device=dev)
    ctx = torch.randn(args.micro_batch, text_len, cfg.text_dim, device=dev)
    t = torch.full((args.micro_batch,), 500.0, device=dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    rows = []
    for label, granularity, modules, compiled in CHOICES:
        if compiled and dev != "cuda":
            continue
        model = WanDiT(cfg).to(dev)  # a fresh model per choice: compiled blocks stay compiled
        if compiled:
            model.compile_blocks()
        model.set_activation_recompute(RecomputeConfig(granularity, 1, modules))

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                v = model(x, t, ctx)
            v.float().square().mean().backward()
            for p in model.parameters():
                p.grad = None

        row = {"choice": label, "granularity": granularity, "modules": list(modules), "compiled": compiled}
        try:
            step()  # warm-up (and compile)
            sync()
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if dev == "cuda" else 0
            t0 = time.perf_counter()
            for _ in range(args.reps):
                step()
            sync()
            row["ms"] = (time.perf_counter() - t0) * 1e3 / args.reps
            if dev == "cuda":
                grads = sum(p.numel() * p.element_size() for p in model.parameters())  # freed after each step
                held = torch.cuda.max_memory_allocated() - before - grads
                row["activation_gib_per_sample"] = held / 2**30 / args.micro_batch
                row["activation_gib_per_block_per_sample"] = row["activation_gib_per_sample"] / args.layers
        except torch.OutOfMemoryError as e:  # a choice that does not fit is a result, not a crash
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        rows.append(row)
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()

    base = next((r for r in rows if r["choice"] == "full" and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["time_vs_full"] = r["ms"] / base["ms"]
            if "activation_gib_per_block_per_sample" in r:
                r["memory_vs_full"] = (r["activation_gib_per_block_per_sample"]
                                       / base["activation_gib_per_block_per_sample"])
    now = _dt.datetime.now(_dt.timezone.utc)
    result = {"card": card, "date": now.isoformat(), "torch": torch.__version__,
              "command": "python benchmarks/recompute.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": "tiny" if args.tiny else "wan-1.3b", "layers": args.layers, "micro_batch": args.micro_batch,
              "tokens": tokens, "text_len": text_len, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()
    path = os.path.join(args.out, f"recompute_{now:%Y%m%dT%H%M%SZ}_{slug}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"recompute on {card}: {args.layers} blocks, micro-batch {args.micro_batch}, {tokens} tokens ({path})")
    print(f"{'choice':24s} {'ms':>9s} {'x full':>7s} {'GiB/block/sample':>17s} {'x full':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['choice']:24s} {r['error']}")
            continue
        gib = r.get("activation_gib_per_block_per_sample")
        print(f"{r['choice']:24s} {r['ms']:9.1f} {r.get('time_vs_full', float('nan')):7.2f} "
              f"{gib if gib is not None else float('nan'):17.3f} {r.get('memory_vs_full', float('nan')):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
