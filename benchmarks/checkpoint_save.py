#!/usr/bin/env python
"""Training-checkpoint save throughput, phase by phase, single process (CPU, or one GPU).

A Wan-shaped model of ``--layers`` blocks (Wan-1.3B's width; 3 blocks: 0.19 B parameters) with
the state a training checkpoint holds for it: weights, fp32 EMA, AdamW moments (the local
backend's layout: 16 bytes a parameter, ~3 GB at 3 blocks). Each ``--threads`` value saves it
through ``CheckpointManager`` (the trainer's path) into ``--dir`` and reports per phase:

  build     the sharded state dict (``sharded_state``)
  plan      megatron-core's plan, validation and write buckets (on GPU: + the D2H staging)
  write     the shard files: serialization + write + streaming CRC-32 + fsync, ``threads`` files
            at once (``hash_cpu_s`` and ``fsync_s`` below are summed over the threads)
  finalize  megatron-core's metadata (``.metadata``, ``metadata.json``, ``common.pt``)
  commit    checksums.json, the renames, the marker

    python benchmarks/checkpoint_save.py --dir /tmp/ckpt-bench --layers 3 --threads 1 2 4
    python benchmarks/checkpoint_save.py --dir /tmp/ckpt-bench --layers 1 --threads 1 --no-hash   # the hash's share

Result JSON (``--out``): machine, command, bytes, seconds per phase and GB/s per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def build_state(layers: int, device: str):
    from rcm_megatron.checkpointing import sharded_state as ss
    from rcm_megatron.models import WanDiT
    from rcm_megatron.models.config import preset

    cfg = dataclasses.replace(preset("wan-1.3b"), num_layers=layers)
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(generator=gen)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters())
    ss.ensure_adam_state(opt)

    def state():
        return {"student": ss.model_sharded_state_dict(model, "student"),
                "ema": ss.tensors_sharded_state_dict(ema, model, "ema", dp_sharded=True),
                "opt_student": ss.optimizer_sharded_state_dict(opt, model, "opt_student")}

    return state, sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="where checkpoints are written (removed after each run)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--no-hash", action="store_true", help="megatron-core's plain open (no streaming CRC-32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=1, help="runs per --threads value (after one warm-up save)")
    p.add_argument("--out", help="result JSON")
    args = p.parse_args(argv)

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from rcm_megatron.checkpointing import checksums
    from rcm_megatron.checkpointing.dist_io import process_group
    from rcm_megatron.checkpointing.save import CheckpointManager
    from rcm_megatron.checkpointing.save_report import state_bytes

    fsync_s = [0.0]
    real_fsync = os.fsync

    def timed_fsync(fd):
        t0 = time.perf_counter()
        real_fsync(fd)
        fsync_s[0] += time.perf_counter() - t0

    os.fsync = timed_fsync
    state, n_params = build_state(args.layers, args.device)
    runs, result_started = [], [False]
    with process_group():
        for threads in [args.threads[0]] + [t for t in args.threads for _ in range(args.repeat)]:
            shutil.rmtree(args.dir, ignore_errors=True)
            mgr = CheckpointManager(args.dir, async_save=args.device == "cuda", thread_count=threads)
            if args.no_hash:  # every install point of the hashing open becomes a no-op
                from rcm_megatron.checkpointing import dist_io, save

                save.install_write_hashing = dist_io.install_write_hashing = lambda: None
                filesystem_async.open = open
            checksums.HASH_SECONDS[0], fsync_s[0] = 0.0, 0.0
            t0, cpu0 = time.perf_counter(), time.process_time()
            sd = state()
            build = time.perf_counter() - t0
            mgr.save(1, sd)
            mgr.finalize(blocking=True)
            del sd
            cpu = time.process_time() - cpu0
            r = mgr.report
            run = {"threads": threads, "hash": not args.no_hash, "bytes": r.bytes,
                   "state_bytes": state_bytes(state()), "build_s": round(build, 3),
                   "phases_s": {k: round(v, 3) for k, v in r.phases.items()}, "save_s": round(r.total_s, 3),
                   "hash_cpu_s": round(checksums.HASH_SECONDS[0], 3), "fsync_s": round(fsync_s[0], 3),
                   "gb_per_s": round(r.bytes / 1e9 / r.total_s, 3), "process_cpu_s": round(cpu, 3)}
            run["warmup"] = not runs and not result_started[0]
            result_started[0] = True
            if not run["warmup"]:
                runs.append(run)
            print(f"{'warm-up, ' if run['warmup'] else ''}threads {threads}: build {build:.2f} s, save {r.line()}; CRC-32 {run['hash_cpu_s']:.2f} s, "
                  f"fsync {run['fsync_s']:.2f} s, process CPU {cpu:.2f} s", flush=True)
            shutil.rmtree(args.dir, ignore_errors=True)
    result = {"benchmark": "checkpoint save throughput (CheckpointManager, single process)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "host": platform.node(),
              "cpus": len(os.sched_getaffinity(0)), "device": args.device, "torch": torch.__version__,
              "command": shlex.join([sys.executable, *sys.argv]), "params": n_params, "layers": args.layers,
              "runs": runs}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
