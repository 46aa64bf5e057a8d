"""Per-GPU memory of optimizer state with megatron-core's distributed optimizer (DP = 1, 2),
and of the student's power EMA, which the trainer shards over DP the same way.

Run under torchrun on N GPUs. Builds the Wan student (bf16 params, fp32 main params), takes
one real training step on a small input so the optimizer state exists, then reports the
optimizer-state bytes this rank holds (on the GPU and, with --cpu-offload, on the host),
the fp32 EMA shadow this rank keeps (``partition_names`` over DP, as in training) and
torch's allocated memory. Writes JSON to --out.

    torchrun --nproc-per-node 2 benchmarks/dp_optimizer_memory.py --model wan-1.3b --out results.json
"""

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rcm_megatron.models import WanDiT, preset  # noqa: E402
from rcm_megatron.parallel.config import ParallelConfig  # noqa: E402
from rcm_megatron.rcm.ema import PowerEMA, partition_names  # noqa: E402
from rcm_megatron.parallel.initialize import destroy_distributed, initialize_distributed  # noqa: E402
from rcm_megatron.training.megatron_dp import MegatronDP, optimizer_state_bytes  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="wan-1.3b")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--cpu-offload", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    par = ParallelConfig()
    initialize_distributed(par)
    cfg = preset(a.model)
    if a.num_layers:
        cfg = cfg.replace(num_layers=a.num_layers)
    torch.cuda.reset_peak_memory_stats()
    model = WanDiT(cfg).cuda().to_dtype(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    base = torch.cuda.memory_allocated()
    dp = MegatronDP(model, cfg, par, lr=1e-6, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.01, clip_grad=None,
                    bf16=True, overlap_grad_reduce=True, overlap_param_gather=False, cpu_offload=a.cpu_offload)
    x = torch.randn(1, cfg.in_channels, 1, 4, 4, device="cuda")
    ctx = torch.randn(1, 8, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    dp.zero_grad()
    with dp.accumulate():
        dp.net(x.bfloat16(), torch.tensor([500.0], device="cuda"), ctx).float().square().mean().backward()
    stepped, gnorm = dp.step()
    torch.cuda.synchronize()
    before_ema = torch.cuda.memory_allocated()
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    ema = PowerEMA(model, 0.1, names=partition_names(sizes, dist.get_world_size())[dist.get_rank()])
    ema.update(model)
    ema_gib = sum(t.numel() * t.element_size() for t in ema.shadow.values()) / 2**30
    ema_alloc_gib = (torch.cuda.memory_allocated() - before_ema) / 2**30
    on_gpu = optimizer_state_bytes(dp, device_type="cuda") / 2**30
    rec = {
        "rank": dist.get_rank(), "world": dist.get_world_size(), "model": a.model, "num_layers": cfg.num_layers,
        "params": params, "stepped": stepped, "grad_norm": gnorm, "cpu_offload": a.cpu_offload,
        "optimizer_state_gib": optimizer_state_bytes(dp) / 2**30, "optimizer_state_on_gpu_gib": on_gpu,
        "ema_shadow_gib": ema_gib, "ema_allocated_gib": ema_alloc_gib, "ema_tensors": len(ema.shadow),
        "allocated_after_wrap_minus_model_gib": (torch.cuda.memory_allocated() - base) / 2**30,
        "allocated_gib": torch.cuda.memory_allocated() / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rec)
    if dist.get_rank() == 0:
        meta = {"card": torch.cuda.get_device_name(), "date": datetime.datetime.utcnow().isoformat() + "Z",
                "command": " ".join(sys.argv), "torch": torch.__version__, "ranks": out}
        with open(a.out, "w") as f:
            json.dump(meta, f, indent=1)
        for r in out:
            print(f"DP={r['world']} rank {r['rank']}: optimizer state {r['optimizer_state_gib']:.2f} GiB "
                  f"({r['optimizer_state_on_gpu_gib']:.2f} on GPU), EMA {r['ema_shadow_gib']:.2f} GiB, "
                  f"allocated {r['allocated_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB, stepped={r['stepped']}")
    destroy_distributed()


if __name__ == "__main__":
    main()
