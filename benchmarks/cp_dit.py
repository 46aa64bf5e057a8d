"""Benchmark: Wan DiT under context parallelism (a2a and p2p) against CP = 1, in one run.

    torchrun --nproc-per-node 4 benchmarks/cp_dit.py [--out DIR] [--deadline 250]

One process group of N GPUs runs, in sequence, CP = 1 (every rank its own full model), then
CP = 2 (N/2 data-parallel replicas of a CP pair) and CP = 4, ..., N, each with
``--cp-comm-type`` a2a (Ulysses) and p2p (ring); the model is built once (the CP layout is
read at forward time), new megatron-core groups are made per CP size. Measured:
  - the tangent pass ``forward_with_tangent`` (no grad; Triton attention-with-tangent),
  - the with-grad student pass: forward + backward of a regression loss, every block
    activation-checkpointed (30 layers at 32760 tokens do not fit one H100 otherwise),
median wall time of synchronized repetitions after a warm-up (the last repetition's outputs
are the ones compared), peak allocated memory (max over
ranks), agreement with CP = 1 (outputs, tangents, loss and a few parameter gradients after the
DP x CP sum), speedup and scaling efficiency t(CP=1) / (CP x t(CP)).
Then the 720p shape (75600 tokens) at the largest CP: the same two passes; last, the 720p shape
at CP = 1 (does it fit one GPU at all; an out-of-memory error is recorded, not fatal).
Weights are drawn on the GPU from one seed (same on every rank; ``reset_parameters``' CPU
init of 1.3B parameters is skipped to save time). ``--deadline`` seconds after start no new
measurement begins (the result JSON is written after every layout).

``--dry``: the tiny model on CPU/gloo (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from tp_dit import log, peak_gib, rel, reset_peak, set_checkpointing, sync, versions  # noqa: E402

from rcm_megatron.models import WanDiT, preset  # noqa: E402
from rcm_megatron.parallel import state  # noqa: E402
from rcm_megatron.parallel.config import ParallelConfig  # noqa: E402
from rcm_megatron.parallel.initialize import initialize_distributed  # noqa: E402

GRAD_PROBES = ("patch_embedding.proj.weight", "blocks.0.attn1.to_q.weight", "blocks.0.attn1.to_k.weight",
               "blocks.0.attn1.to_v.weight", "blocks.0.ffn.fc1.weight", "time_embedding.linear_1.weight",
               "proj_out.weight")


@torch.no_grad()
def gpu_init(model, seed: int):
    """Same weights on every rank, drawn where they live (scaled normal / ones / zeros)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith("scale_shift_table"):
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        else:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)


def make_inputs(cfg, latent, text_len, dev, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    c, f, h, w = latent
    x = torch.randn(1, c, f, h, w, generator=g).to(dev, dtype)
    tx = torch.randn(1, c, f, h, w, generator=g).to(dev, dtype)
    target = torch.randn(1, c, f, h, w, generator=g).to(dev, torch.float32)
    ctx = torch.randn(1, text_len, cfg.text_dim, generator=g).to(dev, dtype)
    return x, torch.tensor([700.0], device=dev), ctx, tx, torch.tensor([1.0], device=dev), target


def timed(fn, dev, reps):
    """(median s, all s, peak GiB incl. warm-up, the last call's result) of fn() after one warm-up."""
    import statistics

    reset_peak(dev)
    out = fn()
    sync(dev)
    times = []
    for _ in range(reps):
        out = None
        dist.barrier()
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, peak_gib(dev), out


def measure(model, inputs, dev, reps, ref=None):
    """Tangent pass and checkpointed with-grad pass; (record, reference data for CP = 1)."""
    x, t, ctx, tx, tt, target = inputs
    rec, mine = {}, {}

    def tangent():
        with torch.no_grad():
            return model.forward_with_tangent(x, t, ctx, tx, tt)

    def student():
        model.zero_grad(set_to_none=True)
        y = model(x, t, ctx)
        loss = (y.float() - target).pow(2).mean()
        loss.backward()
        return y.detach(), loss.detach()

    try:
        med, times, peak, (v, dv) = timed(tangent, dev, reps)
        rec["tangent_pass"] = {"median_s": med, "times_s": times, "peak_gib": peak}
        mine["v"], mine["dv"] = v.float().cpu(), dv.float().cpu()
        if ref is not None and "v" in ref:
            rec["tangent_pass"]["rel_vs_cp1"] = {"v": rel(mine["v"], ref["v"]), "dv": rel(mine["dv"], ref["dv"])}
        del v, dv
    except Exception:  # noqa: BLE001 - keep going, record the failure
        rec["tangent_pass"] = {"error": traceback.format_exc()[-3000:]}
    try:
        set_checkpointing(model, True)
        med, times, peak, (y, loss) = timed(student, dev, reps)
        rec["student_pass_ckpt"] = {"median_s": med, "times_s": times, "peak_gib": peak,
                                    "layers": len(model.blocks), "activation_checkpointing": True}
        grads = {}
        cp_group = state.context_parallel_group()
        for name, p in model.named_parameters():
            name = name.replace(".block.", ".")  # checkpoint wrappers
            if name in GRAD_PROBES:
                g = p.grad.float()
                if state.context_parallel_world_size() > 1:
                    dist.all_reduce(g, group=cp_group)  # the trainer's DP x CP sum, CP part
                grads[name] = g.cpu()
        mine.update(y=y.float().cpu(), loss=float(loss), grads=grads)
        if ref is not None and "y" in ref:
            rec["student_pass_ckpt"]["rel_vs_cp1"] = {
                "y": rel(mine["y"], ref["y"]), "loss": abs(mine["loss"] - ref["loss"]) / abs(ref["loss"]),
                "grads": {n: rel(g, ref["grads"][n]) for n, g in grads.items()}}
    except Exception:  # noqa: BLE001
        rec["student_pass_ckpt"] = {"error": traceback.format_exc()[-3000:]}
    finally:
        set_checkpointing(model, False)
        model.zero_grad(set_to_none=True)
        reset_peak(dev)
    return rec, mine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--preset", default="wan-1.3b")
    ap.add_argument("--latent", default="16,21,60,104", help="C,T,H,W (batch 1): 32760 tokens")
    ap.add_argument("--latent-720p", default="16,21,90,160", help="C,T,H,W: 75600 tokens ('' to skip)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--reps-720p", type=int, default=1)
    ap.add_argument("--skip-720p-cp1", action="store_true", help="do not try the 720p shape without CP")
    ap.add_argument("--comm-types", default="a2a,p2p")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after start: begin no new measurement")
    ap.add_argument("--dry", action="store_true", help="tiny model on CPU/gloo")
    args = ap.parse_args()
    t_start = time.perf_counter()

    if args.dry:
        dev, dtype, cfg, backend = torch.device("cpu"), torch.float32, preset("tiny"), "gloo"
        args.latent, args.latent_720p, args.text_len = "16,3,6,10", "16,3,6,14", 7
        torch.set_num_threads(1)
    else:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dev, dtype, cfg, backend = torch.device("cuda", local), torch.bfloat16, preset(args.preset), "nccl"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10),
                            device_id=None if args.dry else dev)
    world = dist.get_world_size()
    started = datetime.datetime.now(datetime.timezone.utc)
    latent = tuple(map(int, args.latent.split(",")))
    pt, ph, pw = cfg.patch_size
    tokens = (latent[1] // pt) * (latent[2] // ph) * (latent[3] // pw)
    card = "cpu" if args.dry else torch.cuda.get_device_name()
    results = {"benchmark": "cp_dit", "date": started.isoformat(timespec="seconds"), "card": card,
               "command": " ".join(["torchrun", f"--nproc-per-node {world}"] + sys.argv),
               "versions": versions(), "world_size": world, "preset": "tiny" if args.dry else args.preset,
               "config": cfg.to_dict(), "dtype": str(dtype), "latents": [1, *latent], "tokens": tokens,
               "text_len": args.text_len, "reps": args.reps,
               "timing": "median wall time of synchronized repetitions after one warm-up; peak = max over ranks "
                         "of torch.cuda.max_memory_allocated during warm-up and repetitions",
               "layouts": {}}
    log(json.dumps({k: results[k] for k in ("card", "versions", "latents", "tokens", "dtype")}))

    def write():
        if dist.get_rank() != 0:
            return
        os.makedirs(args.out, exist_ok=True)
        tag = "cpu" if args.dry else card.split()[1].lower()
        name = f"cp_dit_{started.strftime('%Y%m%dT%H%M%SZ')}_{tag}x{world}.json"
        results["elapsed_s"] = time.perf_counter() - t_start
        with open(os.path.join(args.out, name), "w") as fh:
            json.dump(results, fh, indent=1)

    real_init = WanDiT.reset_parameters
    if not args.dry:
        WanDiT.reset_parameters = lambda self, seed=0: None
    with torch.device(dev):
        model = WanDiT(cfg)
    WanDiT.reset_parameters = real_init
    if not args.dry:
        gpu_init(model, seed=1)
    model.to_dtype(dtype).requires_grad_(True)
    log(f"model built in {time.perf_counter() - t_start:.0f} s")
    inputs = make_inputs(cfg, latent, args.text_len, dev, dtype)

    def late():
        return time.perf_counter() - t_start > args.deadline

    def summarize(tag, rec, base):
        for key in ("tangent_pass", "student_pass_ckpt"):
            r, b = rec.get(key, {}), (base or {}).get(key, {})
            if "median_s" in r and "median_s" in b:
                cp = rec["cp"]
                r["speedup_vs_cp1"] = b["median_s"] / r["median_s"]
                r["scaling_efficiency"] = b["median_s"] / (cp * r["median_s"])
            msg = "error" if "error" in r else (f"{r['median_s'] * 1e3:.0f} ms, peak {r['peak_gib']:.1f} GiB"
                                                if r else "skipped")
            if "scaling_efficiency" in r:
                msg += f", {r['speedup_vs_cp1']:.2f}x, efficiency {r['scaling_efficiency']:.2f}"
            if "rel_vs_cp1" in r:
                msg += f", vs CP=1 {json.dumps(r['rel_vs_cp1'])}"
            log(f"[{tag}] {key}: {msg}")
            if "error" in r:
                log(r["error"])

    # ---- CP = 1: each rank its own full model, no groups.
    rec, ref = measure(model, inputs, dev, args.reps)
    rec["cp"] = 1
    results["layouts"]["cp1"] = rec
    summarize("cp1", rec, None)
    write()

    comms = args.comm_types.split(",")
    cp_sizes = [c for c in (2, 4, 8) if c <= world and world % c == 0]
    for cp in cp_sizes:
        if late():
            break
        initialize_distributed(ParallelConfig(context_parallel_size=cp, cp_comm_type="p2p",
                                              distributed_backend=backend))
        for comm in comms:
            if late():
                results["layouts"][f"cp{cp}_{comm}"] = {"cp": cp, "skipped": "deadline"}
                continue
            state.set_context_parallel_comm_type(comm)
            rec, _ = measure(model, inputs, dev, args.reps, ref=ref)
            rec.update(cp=cp, comm=comm)
            results["layouts"][f"cp{cp}_{comm}"] = rec
            summarize(f"cp{cp} {comm}", rec, results["layouts"]["cp1"])
            write()
        if cp != cp_sizes[-1]:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()

    # ---- 720p at the largest CP (groups of the last CP size still initialized).
    if args.latent_720p and cp_sizes:
        lat = tuple(map(int, args.latent_720p.split(",")))
        n = (lat[1] // pt) * (lat[2] // ph) * (lat[3] // pw)
        big = make_inputs(cfg, lat, args.text_len, dev, dtype)
        results["720p"] = {"latents": [1, *lat], "tokens": n, "reps": args.reps_720p, "runs": {}}
        for comm in comms[::-1]:  # p2p first
            if late():
                results["720p"]["runs"][f"cp{cp_sizes[-1]}_{comm}"] = {"skipped": "deadline"}
                continue
            state.set_context_parallel_comm_type(comm)
            rec, _ = measure(model, big, dev, args.reps_720p)
            rec.update(cp=cp_sizes[-1], comm=comm)
            results["720p"]["runs"][f"cp{cp_sizes[-1]}_{comm}"] = rec
            summarize(f"720p cp{cp_sizes[-1]} {comm}", rec, None)
            write()
        # The same shape without CP (every rank alone): does it fit one GPU, and how slow is it?
        if not args.skip_720p_cp1 and not late():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            torch.cuda.empty_cache() if dev.type == "cuda" else None
            rec, _ = measure(model, big, dev, args.reps_720p)
            rec["cp"] = 1
            results["720p"]["runs"]["cp1"] = rec
            summarize("720p cp1", rec, None)
            write()
    from rcm_megatron.kernels import chunk_attention

    results["ring_flash_fallback"] = chunk_attention.flash_failures or None
    write()
    peak_gib(dev)  # a last collective so every rank reaches the end together
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
