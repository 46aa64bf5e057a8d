#!/usr/bin/env python
"""Confirm on the GPU why the student step stalled in --bf16 training (issue: the student step
that stalls), by timing the student's tangent pass with the fixed linear and with the defect.

The trainer's student keeps fp32 master weights and runs under bf16 autocast. Before the fix,
``linear_with_tangent`` added the fp32 bias after the bf16 GEMM in the tangent pass only, which
promoted every later activation to fp32: self-attention then ran the fused kernel in fp32 and
cross-attention (fp32 q, bf16 text k/v) fell back to plain math. This probe rebuilds that defect
(``--defect``) by patching the linear, runs one Wan-1.3B tangent pass at 480p (32,760 tokens) in a
child process with a time limit, and reports the dtypes that reached attention and the time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def child(defect: bool, layers: int) -> dict:
    import torch
    import torch.nn.functional as F

    import rcm_megatron.models.attention as model_attention
    from rcm_megatron.models.config import preset
    from rcm_megatron.models.wan import WanDiT
    from rcm_megatron.parallel import tensor_parallel

    if defect:
        def promoting_linear(x, tx, weight, bias):  # the pre-fix code path
            if tx is None:
                return F.linear(x, weight, bias), None
            y, ty = F.linear(torch.cat([x, tx.to(x.dtype)]), weight).chunk(2)
            return (y if bias is None else y + bias), ty
        tensor_parallel.linear_with_tangent = promoting_linear
    seen = {}

    def spy(fn):
        def wrapped(q, k, v, *a, **kw):
            seen[f"{q.dtype}/{k.dtype} Lq={q.shape[1]} Lk={k.shape[1]}"] = seen.get(
                f"{q.dtype}/{k.dtype} Lq={q.shape[1]} Lk={k.shape[1]}", 0) + 1
            return fn(q, k, v, *a, **kw)
        return wrapped

    model_attention.attention_with_tangent = spy(model_attention.attention_with_tangent)
    cfg = preset("wan-1.3b").replace(num_layers=layers)
    net = WanDiT(cfg).cuda()  # fp32 master weights, as the trainer's student
    x = torch.randn(1, 16, 21, 60, 104, device="cuda")
    ctx = torch.randn(1, 512, 4096, device="cuda")
    t = torch.full((1,), 500.0, device="cuda")
    times = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.time()
            net.forward_with_tangent(x, t, ctx, x, torch.ones(1, device="cuda"))
            torch.cuda.synchronize()
            times.append(time.time() - t0)
    return {"defect": defect, "layers": layers, "seconds": times, "attention_inputs": seen,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--child", choices=["fixed", "defect"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child == "defect", args.layers)))
        return 0
    results = []
    for mode in ("fixed", "defect"):
        cmd = [sys.executable, __file__, "--child", mode, "--layers", str(args.layers)]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            r = json.loads(line[0][7:]) if line else {"defect": mode == "defect", "error": p.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            r = {"defect": mode == "defect", "timed_out_after_s": round(time.time() - t0, 1)}
        results.append(r)
        print(mode, json.dumps(r))
    if args.out:
        json.dump({"probe": "tangent pass, Wan-1.3B 480p, fp32 master weights under bf16 autocast",
                   "results": results}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
