"""Benchmark: Wan DiT under tensor (and sequence) parallelism against TP = 1, in one run.

    torchrun --nproc-per-node 2 benchmarks/tp_dit.py [--out DIR] [--layers 30] [--latent 16,21,60,104]

Measures, for TP = 1 (each rank runs its own full model, no communication) and TP = 2
without and with sequence parallelism:
  - the tangent pass ``forward_with_tangent`` (no grad; fused Triton attention-with-tangent),
  - the with-grad student pass: forward + backward of a regression loss, with activation
    checkpointing of every block (30 layers at 32760 tokens do not fit one H100 otherwise),
  - the with-grad pass without checkpointing on the first ``--nockpt-layers`` blocks (how the
    activation memory splits over TP / SP).
Median wall time over ``--reps`` timed repetitions after a warm-up (synchronized), peak
allocated memory per GPU (torch.cuda.max_memory_allocated, max over ranks), and bf16
agreement of the TP = 2 outputs and tangents with TP = 1 (same seed = same weights).

``--dry``: the tiny model on CPU/gloo (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rcm_megatron.models import WanDiT, preset  # noqa: E402
from rcm_megatron.parallel import state  # noqa: E402
from rcm_megatron.parallel.config import ParallelConfig  # noqa: E402
from rcm_megatron.parallel.initialize import initialize_distributed  # noqa: E402


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


class Checkpointed(nn.Module):
    """Recompute a block in backward (only when grad is on)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)
        return self.block(*args)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev):
    if dev.type != "cuda":
        return 0.0
    t = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**30], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(fn, dev, reps, group=None):
    """(median seconds, all seconds, peak GiB incl. warm-up) of fn() after one warm-up."""
    reset_peak(dev)
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, peak_gib(dev)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build(cfg, dtype, dev, layers=None):
    c = cfg if layers is None else cfg.replace(num_layers=layers)
    t0 = time.perf_counter()
    m = WanDiT(c).to(dev)
    m.to_dtype(dtype)
    m.requires_grad_(True)
    return m, time.perf_counter() - t0


def set_checkpointing(model, on: bool):
    for k, b in list(model.blocks.items()):
        inner = b.block if isinstance(b, Checkpointed) else b
        model.blocks[k] = Checkpointed(inner) if on else inner


def measure(model, inputs, dev, reps, tag, results, ref=None, nockpt_model=None):
    x, t, ctx, tx, tt, target = inputs
    rec = {}

    def tangent():
        with torch.no_grad():
            return model.forward_with_tangent(x, t, ctx, tx, tt)

    def student(m=model):
        m.zero_grad(set_to_none=True)
        y = m(x, t, ctx)
        loss = (y.float() - target).pow(2).mean()
        loss.backward()
        return loss

    try:
        med, times, peak = timed(tangent, dev, reps)
        rec["tangent_pass"] = {"median_s": med, "times_s": times, "peak_gib": peak}
        log(f"[{tag}] tangent pass: {med * 1e3:.0f} ms, peak {peak:.1f} GiB")
        v, dv = tangent()
        if ref is None:
            results.setdefault("_ref", {})["v"], results["_ref"]["dv"] = v.float().cpu(), dv.float().cpu()
        else:
            rec["rel_vs_tp1"] = {"v": rel(v.float().cpu(), ref["v"]), "dv": rel(dv.float().cpu(), ref["dv"])}
            log(f"[{tag}] vs TP=1: v {rec['rel_vs_tp1']['v']:.2e}, dv {rec['rel_vs_tp1']['dv']:.2e}")
        del v, dv
    except Exception:  # noqa: BLE001 - keep going, record the failure
        rec["tangent_pass"] = {"error": traceback.format_exc()[-2000:]}
        log(f"[{tag}] tangent pass failed:\n{rec['tangent_pass']['error']}")
    for name, m, ckpt in (("student_pass_ckpt", model, True), ("student_pass_nockpt", nockpt_model, False)):
        if m is None:
            continue
        try:
            set_checkpointing(m, ckpt)
            med, times, peak = timed(lambda: student(m), dev, reps)
            rec[name] = {"median_s": med, "times_s": times, "peak_gib": peak,
                         "layers": len(m.blocks), "activation_checkpointing": ckpt}
            log(f"[{tag}] {name} ({len(m.blocks)} layers): {med * 1e3:.0f} ms, peak {peak:.1f} GiB")
        except Exception:  # noqa: BLE001
            rec[name] = {"error": traceback.format_exc()[-2000:]}
            log(f"[{tag}] {name} failed:\n{rec[name]['error']}")
        finally:
            set_checkpointing(m, False)
            m.zero_grad(set_to_none=True)
            reset_peak(dev)
    results[tag] = rec


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "megatron.core"):
        try:
            out[mod] = __import__(mod, fromlist=["x"]).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        out["gpu"] = torch.cuda.get_device_name()
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split()[0]
        except Exception:  # noqa: BLE001
            pass
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
        out["git_commit"] = sha if len(sha) == 40 else None  # the device machines get no .git
    except Exception:  # noqa: BLE001
        out["git_commit"] = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--preset", default="wan-1.3b")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the preset's)")
    ap.add_argument("--nockpt-layers", type=int, default=6)
    ap.add_argument("--latent", default="16,21,60,104", help="C,T,H,W of the latents (batch 1)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dry", action="store_true", help="tiny model on CPU/gloo")
    args = ap.parse_args()

    backend = "gloo" if args.dry else "nccl"
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))  # CPU init
    if args.dry:
        dev = torch.device("cpu")
        dtype = torch.float32
        cfg = preset("tiny")
        args.latent, args.text_len, args.nockpt_layers = "16,3,6,10", 7, 1
    else:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dtype = torch.bfloat16
        cfg = preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10),
                            device_id=None if args.dry else dev)
    world = dist.get_world_size()
    c, f, h, w = map(int, args.latent.split(","))
    pt, ph, pw = cfg.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {"benchmark": "tp_dit", "date": started.isoformat(timespec="seconds"),
               "command": " ".join(["torchrun", f"--nproc-per-node {world}"] + sys.argv),
               "versions": versions(), "world_size": world, "preset": args.preset if not args.dry else "tiny",
               "config": cfg.to_dict(), "dtype": str(dtype), "latents": [1, c, f, h, w], "tokens": tokens,
               "text_len": args.text_len, "reps": args.reps,
               "attention_backend": os.environ.get("RCM_ATTENTION_BACKEND", "auto"),
               "timing": "median wall time of synchronized repetitions after one warm-up; peak = "
                         "max over ranks of torch.cuda.max_memory_allocated during warm-up and repetitions"}
    log(json.dumps({k: results[k] for k in ("versions", "latents", "tokens", "dtype")}))

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, c, f, h, w, generator=g).to(dev, dtype)
    tx = torch.randn(1, c, f, h, w, generator=g).to(dev, dtype)
    target = torch.randn(1, c, f, h, w, generator=g).to(dev, torch.float32)
    ctx = torch.randn(1, args.text_len, cfg.text_dim, generator=g).to(dev, dtype)
    t = torch.tensor([700.0], device=dev)
    tt = torch.tensor([1.0], device=dev)
    inputs = (x, t, ctx, tx, tt, target)

    def write():
        if dist.get_rank() != 0:
            return
        os.makedirs(args.out, exist_ok=True)
        card = "cpu" if args.dry else torch.cuda.get_device_name().split()[1].lower()
        name = f"tp_dit_{started.strftime('%Y%m%dT%H%M%SZ')}_{card}x{world}.json"
        public = {k: v for k, v in results.items() if not k.startswith("_")}
        with open(os.path.join(args.out, name), "w") as fh:
            json.dump(public, fh, indent=1)

    # ---- TP = 1: every rank its own full model (process groups not yet initialized).
    model, secs = build(cfg, dtype, dev)
    nockpt = build(cfg, dtype, dev, layers=args.nockpt_layers)[0] if args.nockpt_layers else None
    log(f"TP=1 model built in {secs:.0f} s")
    measure(model, inputs, dev, args.reps, "tp1", results, nockpt_model=nockpt)
    del model, nockpt
    reset_peak(dev)
    write()

    # ---- TP = world size, without and with sequence parallelism (same weights by seed).
    tp = world
    initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=False,
                                          distributed_backend=backend))
    model, secs = build(cfg, dtype, dev)
    nockpt = build(cfg, dtype, dev, layers=args.nockpt_layers)[0] if args.nockpt_layers else None
    log(f"TP={tp} model built in {secs:.0f} s")
    for sp in (False, True):
        state.set_sequence_parallel(sp)
        measure(model, inputs, dev, args.reps, f"tp{tp}" + ("_sp" if sp else ""), results, ref=results["_ref"],
                nockpt_model=nockpt)
        write()
    state.set_sequence_parallel(False)

    if dist.get_rank() == 0:
        print("\n| layout | tangent pass | student pass (ckpt) | student pass, "
              f"{args.nockpt_layers} layers, no ckpt |")
        print("| --- | --- | --- | --- |")
        for tag in [k for k in results if k.startswith("tp")]:
            r = results[tag]

            def cell(key):
                v = r.get(key, {})
                return "error" if "error" in v or not v else f"{v['median_s'] * 1e3:.0f} ms, {v['peak_gib']:.1f} GiB"
            print(f"| {tag} | {cell('tangent_pass')} | {cell('student_pass_ckpt')} | {cell('student_pass_nockpt')} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
