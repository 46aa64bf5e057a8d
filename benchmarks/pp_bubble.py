"""Benchmark: the pipeline bubble of the rCM pass plan at PP = 2 against the analytic
(p - 1) / (m + p - 1), on a slice of Wan 1.3B.

    torchrun --nproc-per-node 2 benchmarks/pp_bubble.py [--out DIR] [--layers 8] [--latent 16,21,60,104]
    torchrun --nproc-per-node 2 benchmarks/pp_bubble.py --dry      # tiny model on CPU/gloo: checks the script

Each rank holds one stage (``--layers`` / 2 blocks; embeddings on stage 0, the head on
stage 1) and runs the code paths of training, ``training/pipeline_step.py``:
  - ``forward``: a forward-only network call over m micro-batches (``PipelinedNet``; one
    forward sweep, then the output broadcast to every stage), as the teacher / rollout calls;
  - ``tangent``: the same with the tangent (the sCM tangent pass);
  - ``1f1b``: with-grad regressions of m micro-batches through ``run_regressions`` (1F1B).
For each pass the per-micro-batch compute time of every stage is measured alone (same
inputs, no communication); t_stage is the slowest stage's. The ideal pipelined time is
m * t_stage, and three bubble fractions are reported:
  - measured: 1 - m * t_stage / T(m), T(m) the pipelined time (transfers and the output
    broadcast included);
  - analytic: (p - 1) / (m + p - 1), a balanced pipeline with free communication;
  - stage model: 1 - m * t_stage / (sum_s t_s + (m - 1) * t_stage), what the measured,
    unequal stage times predict (stage 0 also embeds, the last stage applies the head).
Median of ``--reps`` synchronized repetitions after a warm-up (peak GPU memory: max over ranks);
micro-batch size 1; bf16 parameters (the teacher's precision; the trained models are fp32
under autocast in training).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from tp_dit import log, timed, versions  # noqa: E402  (the benchmarks' shared helpers)
from rcm_megatron.models import WanDiT, preset  # noqa: E402
from rcm_megatron.parallel.config import ParallelConfig  # noqa: E402
from rcm_megatron.parallel.initialize import initialize_distributed  # noqa: E402
from rcm_megatron.parallel.pipeline import PipelineLayout, StageLink, forward_sweep, stage_layer_range  # noqa: E402
from rcm_megatron.training.pipeline_step import PipelinedNet, run_regressions, stage_forward  # noqa: E402


def max_over_ranks(x: float, dev) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def per_stage(x: float, dev) -> list[float]:
    """x of every rank (= every stage: the world is one pipeline), in stage order."""
    t = torch.tensor([x], dtype=torch.float64, device=dev)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(v) for v in out]


def captured_inputs(model, link, lat, t, ctx, tl=None, tt=None):
    """What this stage receives for one micro-batch (None on the first stage), via a real sweep."""
    box = {}

    def step(k, received):
        box["received"] = None if received is None else [None if r is None else r.clone() for r in received]
        return stage_forward(model, lat, t, ctx, tl, tt, received)

    forward_sweep(1, step, link)
    return box["received"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--preset", default="wan-1.3b")
    ap.add_argument("--layers", type=int, default=8, help="blocks of the slice (split equally over the stages)")
    ap.add_argument("--latent", default="16,21,60,104", help="C,T,H,W of one sample's latents")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--micro-batches", default="1,2,4,8", help="values of m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dry", action="store_true", help="tiny-4l model on CPU/gloo")
    args = ap.parse_args()

    if args.dry:
        dev, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
        cfg = preset("tiny-4l")
        args.latent, args.text_len, args.layers = "16,2,4,4", 5, 4
        args.micro_batches = "1,2,4"
    else:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dev, dtype, backend = torch.device("cuda", local), torch.bfloat16, "nccl"
        cfg = preset(args.preset)
    cfg = cfg.replace(num_layers=args.layers)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialize_distributed(ParallelConfig(pipeline_model_parallel_size=world, distributed_backend=backend))
    layout = PipelineLayout.current()
    link = StageLink(layout, dev)
    p = layout.size
    model = WanDiT(cfg, pre_process=layout.is_first, post_process=layout.is_last,
                   layer_range=stage_layer_range(cfg.num_layers, p, layout.rank)).to(dev)
    model.to_dtype(dtype)
    model.requires_grad_(True)

    c, f, h, w = map(int, args.latent.split(","))
    ms = [int(m) for m in args.micro_batches.split(",")]
    mmax = max(ms)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(mmax, c, f, h, w, generator=g).to(dev, dtype)
    tl = torch.randn(mmax, c, f, h, w, generator=g).to(dev, dtype)
    ctx = torch.randn(mmax, args.text_len, cfg.text_dim, generator=g).to(dev, dtype)
    target = torch.randn(mmax, cfg.out_channels, f, h, w, generator=g).to(dev, torch.float32)
    t = torch.full((mmax,), 700.0, device=dev)
    tt = torch.ones(mmax, device=dev)
    pt, ph, pw = cfg.patch_size
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {"benchmark": "pp_bubble", "date": started.isoformat(timespec="seconds"),
               "command": " ".join(["torchrun", f"--nproc-per-node {world}"] + sys.argv), "versions": versions(),
               "pipeline_stages": p, "preset": "tiny-4l" if args.dry else args.preset, "config": cfg.to_dict(),
               "dtype": str(dtype), "latents_per_sample": [c, f, h, w],
               "tokens": (f // pt) * (h // ph) * (w // pw), "text_len": args.text_len, "micro_batch_size": 1,
               "reps": args.reps, "passes": {}}

    # ---- every stage alone: per-micro-batch compute, no communication
    one = slice(0, 1)
    recv = captured_inputs(model, link, lat[one], t[one], ctx[one])
    recv_t = captured_inputs(model, link, lat[one], t[one], ctx[one], tl[one], tt[one])

    def alone_forward():
        with torch.no_grad():
            stage_forward(model, lat[one], t[one], ctx[one], None, None, recv)

    def alone_tangent():
        with torch.no_grad():
            stage_forward(model, lat[one], t[one], ctx[one], tl[one], tt[one], recv_t)

    def alone_grad():
        inputs = None if recv is None else [None if r is None else r.detach().requires_grad_(r.is_floating_point())
                                            for r in recv]
        out = stage_forward(model, lat[one], t[one], ctx[one], None, None, inputs)
        if layout.is_last:
            (out[0].float() - target[one]).square().sum().backward()
        else:
            roots = [o for o in out if o is not None and o.requires_grad]
            torch.autograd.backward(roots, [torch.ones_like(o) for o in roots])
        model.zero_grad(set_to_none=True)

    alone = {}
    for name, fn in (("forward", alone_forward), ("tangent", alone_tangent), ("1f1b", alone_grad)):
        med, _, _ = timed(fn, dev, args.reps)
        stages = per_stage(med, dev)
        alone[name] = {"stage_s": stages, "t_stage_s": max(stages)}
        log(f"{name}: slowest stage alone {alone[name]['t_stage_s'] * 1e3:.1f} ms per micro-batch")

    # ---- pipelined, through the training code paths
    def pipelined(name, m):
        s = slice(0, m)
        if name == "forward":
            return lambda: PipelinedNet(model, 1, link)(lat[s], t[s], ctx[s])
        if name == "tangent":
            return lambda: PipelinedNet(model, 1, link).forward_with_tangent(lat[s], t[s], ctx[s], tl[s], tt[s])
        items = [("loss", lambda net, k=k: (net(lat[k:k + 1], t[k:k + 1], ctx[k:k + 1]).float()
                                             - target[k:k + 1]).square().sum()) for k in range(m)]

        def run():
            run_regressions(model, items, link)
            model.zero_grad(set_to_none=True)
        return run

    for name in ("forward", "tangent", "1f1b"):
        rows = []
        for m in ms:
            med, times, peak = timed(pipelined(name, m), dev, args.reps)
            med = max_over_ranks(med, dev)
            ideal = m * alone[name]["t_stage_s"]
            # Fill and drain with the measured, unequal stage times: sum_s t_s + (m - 1) max_s t_s.
            modeled = sum(alone[name]["stage_s"]) + (m - 1) * alone[name]["t_stage_s"]
            row = {"m": m, "median_s": med, "times_s": times, "peak_gib": peak, "ideal_s": ideal,
                   "bubble_measured": 1.0 - ideal / med, "bubble_analytic": (p - 1) / (m + p - 1),
                   "bubble_stage_model": 1.0 - ideal / modeled}
            rows.append(row)
            log(f"{name} m={m}: {med * 1e3:.1f} ms, ideal {ideal * 1e3:.1f} ms, bubble measured "
                f"{row['bubble_measured']:.3f} vs analytic {row['bubble_analytic']:.3f} "
                f"(stage model {row['bubble_stage_model']:.3f})")
        results["passes"][name] = {"alone": alone[name], "pipelined": rows}

    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        card = "cpu" if args.dry else torch.cuda.get_device_name().split()[1].lower()
        path = os.path.join(args.out, f"pp_bubble_{started.strftime('%Y%m%dT%H%M%SZ')}_{card}x{world}.json")
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {path}")
        print("\n| pass | m | measured | ideal m*t_stage | bubble measured | bubble analytic | stage model |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, r in results["passes"].items():
            for row in r["pipelined"]:
                print(f"| {name} | {row['m']} | {row['median_s'] * 1e3:.1f} ms | {row['ideal_s'] * 1e3:.1f} ms | "
                      f"{row['bubble_measured']:.3f} | {row['bubble_analytic']:.3f} | {row['bubble_stage_model']:.3f} |")
    dist.barrier()
    from rcm_megatron.parallel.initialize import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
