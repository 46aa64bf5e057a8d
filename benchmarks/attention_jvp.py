"""Benchmark: attention with tangent (our Triton kernel) against cuDNN / flash SDPA forward.

One run on one GPU measures, per shape (batch 1, head dim 128, bf16, non-causal):
  cuDNN SDPA forward, flash SDPA forward, our kernel with full tangents (6 matmul units),
  our kernel with zero K/V tangents (4 units), and torch.func.jvp over plain-math attention at a
  length where its [L, L] matrices fit. Reports median time (triton.testing.do_bench), TFLOP/s
  (units of 2*Lq*Lk*d per head: 2 forward, 6 full tangents, 4 zero-KV tangents), the ratio to
  cuDNN forward in the same run, peak extra memory, and the first-call latency at a fresh
  sequence length after warm-up. It also checks bf16 accuracy against a float64 jvp oracle on
  sampled query rows at the benchmark shapes, and prints the kernel's resource report
  (registers, spills, shared memory, wgmma count).

  python benchmarks/attention_jvp.py [--sweep] [--out DIR] [--quick]

--sweep times candidate launch configs for the two cache keys first (full tangents on the
12-head self-attention shape, zero-KV tangents on the cross-attention shape) and uses the fastest
correct one; the chosen table is written as JSON (loadable with tuning.load_tuning).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rcm_megatron.kernels import attention_reference, tuning  # noqa: E402
from rcm_megatron.kernels import triton_attention as ta  # noqa: E402
from rcm_megatron.kernels.tuning import AttnConfig  # noqa: E402

DT = torch.bfloat16
D = 128
DEV = "cuda"
DRY = False  # --dry: tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script, not speed)
SHAPES = [
    # name, Lq, Lk, heads, kind
    ("self_h12_L32760", 32760, 32760, 12, "self"),
    ("self_h5_L32760", 32760, 32760, 5, "self"),
    ("self_h12_L75600", 75600, 75600, 12, "self"),
    ("cross_h12_32760x512", 32760, 512, 12, "cross"),
]
JVP_SHAPE = ("self_h12_L8192", 8192, 8192, 12, "self")


def log(*a):
    print(*a, flush=True)


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def inputs(Lq, Lk, H, kvt=True, seed=0):
    if DRY:
        Lq, Lk, H = min(Lq, 40), min(Lk, 24), min(H, 2)
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda L: torch.randn(1, L, H, D, generator=g, device=DEV, dtype=DT)  # noqa: E731
    q, q_tan, k, v = r(Lq), r(Lq), r(Lk), r(Lk)
    k_tan, v_tan = (r(Lk), r(Lk)) if kvt else (None, None)
    return q, k, v, q_tan, k_tan, v_tan


def bench(fn, big=False):
    fn()
    sync()
    if DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=100 if big else 25, rep=600 if big else 200,
                                   return_mode="median")


def peak_extra_gb(fn):
    if DRY:
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def flops(Lq, Lk, H, units):
    return units * 2.0 * Lq * Lk * D * H


def sdpa_fn(q, k, v, backend):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt)

    return fn


def ours_fn(q, k, v, q_tan, k_tan, v_tan, cfg=None):
    return lambda: ta.triton_attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, config=cfg)


def oracle_rows(args, rows):
    q, k, v, q_tan, k_tan, v_tan = args
    q, k, v, q_tan = (x.double() for x in (q, k, v, q_tan))
    k_tan = torch.zeros_like(k) if k_tan is None else k_tan.double()
    v_tan = torch.zeros_like(v) if v_tan is None else v_tan.double()
    q, q_tan = q[:, rows], q_tan[:, rows]
    s = 1.0 / math.sqrt(D)

    def f(q_, k_, v_):
        return attention_reference(q_, k_, v_), torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q_, k_) * s, -1)

    (o, lse), (o_tan, lse_tan) = torch.func.jvp(f, (q, k, v), (q_tan, k_tan, v_tan))
    return o, o_tan, lse, lse_tan


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def accuracy(args, res, nrows=256, seed=0):
    Lq = args[0].shape[1]
    g = torch.Generator(device=DEV).manual_seed(seed)
    rows = torch.randperm(Lq, generator=g, device=DEV)[:nrows].sort().values
    want = oracle_rows(args, rows)
    o, o_tan, lse, lse_tan = res
    got = (o[:, rows], o_tan[:, rows], lse[:, :, rows], lse_tan[:, :, rows])
    return {n: rel(a, b) for n, a, b in zip(("out", "tout", "lse", "tlse"), got, want)}


def resource_report():
    k = ta._last_kernel
    if k is None:
        return {}
    rep = {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None)}
    md = getattr(k, "metadata", None)
    rep["shared_bytes"] = getattr(md, "shared", None) if md is not None else None
    try:
        ptx = k.asm.get("ptx", "")
        rep["wgmma"] = ptx.count("wgmma.mma_async")
        rep["mma_sync"] = ptx.count("mma.sync")
        rep["ld_local"] = ptx.count("ld.local")
        rep["st_local"] = ptx.count("st.local")
        rep["cp_async_bulk_tensor"] = ptx.count("cp.async.bulk.tensor")
        rep["cp_async"] = ptx.count("cp.async.ca") + ptx.count("cp.async.cg")
    except Exception:
        pass
    return rep


def sweep(results, quick=False):
    """Time candidate configs per cache key; keep the fastest one whose bf16 error is < 1e-2."""
    cands_full = tuning.candidate_configs(D, DT, True)
    cands_q = tuning.candidate_configs(D, DT, False)
    if quick:
        cands_full, cands_q = cands_full[:2], cands_q[:2]
    plans = [("full", (32760, 32760, 12), True, cands_full), ("q_only", (32760, 512, 12), False, cands_q)]
    chosen = {}
    for key, (Lq, Lk, H), kvt, cands in plans:
        args = inputs(Lq, Lk, H, kvt, seed=1)
        small = inputs(2048, min(Lk, 2048), H, kvt, seed=2)
        best = None
        for cfg in cands:
            rec = {"key": key, "shape": [Lq, Lk, H], "config": cfg.as_dict()}
            try:
                t0 = time.perf_counter()
                res = ta.triton_attention_with_tangent(*small, config=cfg)
                sync()
                rec["compile_and_first_call_s"] = time.perf_counter() - t0
                rec["resources"] = resource_report()
                rec["err_L2048"] = accuracy(small, res, nrows=512)
                ms = bench(ours_fn(*args, cfg=cfg))
                rec["ms"] = ms
                rec["tflops"] = flops(Lq, Lk, H, 6 if kvt else 4) / ms / 1e9
                ok = max(rec["err_L2048"]["out"], rec["err_L2048"]["tout"]) < 1e-2
                rec["ok"] = ok
                if ok and (best is None or ms < best[1]):
                    best = (cfg, ms)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log("sweep", json.dumps(rec))
            results["sweep"].append(rec)
        if best is not None:
            tuning.set_config(args[0].device, D, DT, kvt, best[0])
            chosen[key] = best[0].as_dict()
        del args, small
        empty_cache()
    results["chosen_configs"] = chosen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer configs and shapes (smoke run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per shape")
    ap.add_argument("--dry", action="store_true", help="CPU + TRITON_INTERPRET=1 script check")
    a = ap.parse_args()
    global DEV, DT, DRY
    if a.dry:
        DEV, DT, DRY = "cpu", torch.float32, True
    os.makedirs(a.out, exist_ok=True)
    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu-interpreter"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results = {
        "benchmark": "attention_jvp",
        "card": dev,
        "date_utc": stamp,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": str(DT),
        "head_dim": D,
        "batch": 1,
        "sweep": [],
        "rows": [],
        "first_call": [],
    }
    path = os.path.join(a.out, f"attention_jvp_{stamp}{('_' + a.tag) if a.tag else ''}.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    log(f"card {dev} torch {torch.__version__} triton {triton.__version__}")

    # Cold compile: the first call of the process (empty Triton cache on a fresh machine).
    try:
        small = inputs(4096, 4096, 12, True, seed=5)
        t0 = time.perf_counter()
        ta.triton_attention_with_tangent(*small)
        sync()
        results["cold_first_call_s_full"] = time.perf_counter() - t0
        results["default_config_full"] = tuning.get_config(small[0].device, D, DT, True).as_dict()
        results["resources_default_full"] = resource_report()
        t0 = time.perf_counter()
        ta.triton_attention_with_tangent(*small[:4])
        sync()
        results["cold_first_call_s_q_only"] = time.perf_counter() - t0
        results["resources_default_q_only"] = resource_report()
        log("cold first calls", results["cold_first_call_s_full"], results["cold_first_call_s_q_only"])
        del small
    except Exception:
        results["cold_error"] = traceback.format_exc()[-2000:]
        log(results["cold_error"])
    save()

    if a.sweep:
        sweep(results, quick=a.quick)
        tuning.save_tuning(os.path.join(a.out, "attention_tuning_h100.json"))
        save()

    shapes = SHAPES[:1] + SHAPES[3:] if a.quick else SHAPES
    for name, Lq, Lk, H, kind in shapes:
        big = Lq > 40000
        row = {"shape": name, "Lq": Lq, "Lk": Lk, "heads": H, "kind": kind, "rounds": a.rounds}
        args = None
        try:
            args = inputs(Lq, Lk, H, True, seed=7)
            q, k, v, q_tan, k_tan, v_tan = args
            methods = (
                ("cudnn_fwd", sdpa_fn(q, k, v, SDPBackend.CUDNN_ATTENTION), 2),
                ("flash_fwd", sdpa_fn(q, k, v, SDPBackend.FLASH_ATTENTION), 2),
                ("ours_full", ours_fn(q, k, v, q_tan, k_tan, v_tan), 6),
                ("ours_zero_kv", ours_fn(q, k, v, q_tan, None, None), 4),
            )
            meas = {mname: {"ms_rounds": []} for mname, _, _ in methods}
            # Interleaved rounds (cuDNN, flash, ours, ours, cuDNN, ...): every method sees the
            # same mix of GPU temperatures and clocks; the median over rounds is reported.
            for _ in range(a.rounds):
                for mname, fn, units in methods:
                    m = meas[mname]
                    if "error" in m:
                        continue
                    try:
                        m["ms_rounds"].append(bench(fn, big))
                    except Exception as e:
                        m["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for mname, fn, units in methods:
                m = meas[mname]
                if m["ms_rounds"]:
                    m["ms"] = sorted(m["ms_rounds"])[len(m["ms_rounds"]) // 2]
                    m["tflops"] = flops(Lq, Lk, H, units) / m["ms"] / 1e9
                    try:
                        m["peak_extra_gb"] = peak_extra_gb(fn)
                    except Exception as e:
                        m["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    if mname.startswith("ours"):
                        m["resources"] = resource_report()
                        m["config"] = tuning.get_config(q.device, D, DT, mname == "ours_full").as_dict()
            base = meas["cudnn_fwd"].get("ms")
            for m in meas.values():
                if base and "ms" in m:
                    m["ratio_vs_cudnn_fwd"] = m["ms"] / base
            row["methods"] = meas
            # accuracy at the benchmark shape on sampled query rows (float64 jvp oracle)
            row["err_full"] = accuracy(args, ta.triton_attention_with_tangent(*args), nrows=256)
            row["err_zero_kv"] = accuracy(args[:4] + (None, None), ta.triton_attention_with_tangent(*args[:4]),
                                          nrows=256)
        except Exception:
            row["error"] = traceback.format_exc()[-2000:]
        log("row", json.dumps(row))
        results["rows"].append(row)
        del args
        empty_cache()
        save()

    # torch.func.jvp over plain-math attention where its [L, L] matrices fit
    try:
        name, Lq, Lk, H, kind = JVP_SHAPE
        q, k, v, q_tan, k_tan, v_tan = inputs(Lq, Lk, H, True, seed=8)
        jfn = lambda: torch.func.jvp(attention_reference, (q, k, v), (q_tan, k_tan, v_tan))  # noqa: E731
        row = {"shape": name, "Lq": Lq, "Lk": Lk, "heads": H, "kind": kind, "methods": {}}
        for mname, fn, units in (
            ("cudnn_fwd", sdpa_fn(q, k, v, SDPBackend.CUDNN_ATTENTION), 2),
            ("ours_full", ours_fn(q, k, v, q_tan, k_tan, v_tan), 6),
            ("jvp_math", jfn, 6),
        ):
            m = {"ms": bench(fn)}
            m["tflops"] = flops(Lq, Lk, H, units) / m["ms"] / 1e9
            m["peak_extra_gb"] = peak_extra_gb(fn)
            row["methods"][mname] = m
        base = row["methods"]["cudnn_fwd"]["ms"]
        for m in row["methods"].values():
            m["ratio_vs_cudnn_fwd"] = m["ms"] / base
        o_j, o_tan_j = jfn()
        o, o_tan, _, _ = ta.triton_attention_with_tangent(q, k, v, q_tan, k_tan, v_tan)
        row["ours_vs_jvp_math_bf16"] = {"out": rel(o, o_j), "tout": rel(o_tan, o_tan_j)}
        log("row", json.dumps(row))
        results["rows"].append(row)
        del q, k, v, q_tan, k_tan, v_tan
    except Exception:
        results["jvp_error"] = traceback.format_exc()[-2000:]
        log(results["jvp_error"])
    empty_cache()
    save()

    # First call at a fresh sequence length after warm-up (no recompile, no retune expected)
    for L, H, kvt in ((32768, 12, True), (32761, 12, True), (30001, 12, True), (40000, 5, True),
                      (32777, 12, False)):
        args = None
        try:
            args = inputs(L, L if kvt else 512, H, kvt, seed=L)
            if not kvt:
                args = args[:4]
            sync()
            t0 = time.perf_counter()
            ta.triton_attention_with_tangent(*args)
            sync()
            first = time.perf_counter() - t0
            steady = bench(lambda: ta.triton_attention_with_tangent(*args)) / 1e3
            rec = {"L": L, "heads": H, "kv_tangent": kvt, "first_call_s": first, "steady_s": steady}
        except Exception as e:
            rec = {"L": L, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        log("first_call", json.dumps(rec))
        results["first_call"].append(rec)
        empty_cache()
    save()

    # Table
    log("\n| shape | method | ms | TFLOP/s | x cuDNN fwd | peak extra GB |")
    log("|---|---|---|---|---|---|")
    for row in results["rows"]:
        for mname, m in row.get("methods", {}).items():
            if "ms" in m:
                rr = " ".join(f"{x:.3f}" for x in m.get("ms_rounds", []))
                log(f"| {row['shape']} | {mname} | {m['ms']:.3f} | {m['tflops']:.0f} | "
                    f"{m.get('ratio_vs_cudnn_fwd', float('nan')):.2f} | {m.get('peak_extra_gb', float('nan')):.2f} |"
                    + (f" rounds: {rr}" if rr else ""))
            else:
                log(f"| {row['shape']} | {mname} | {m.get('error', '?')[:80]} |")
        for ek in ("err_full", "err_zero_kv"):
            if ek in row:
                log(f"  {row['shape']} {ek}: " + " ".join(f"{k}={v:.2e}" for k, v in row[ek].items()))
    for rec in results["first_call"]:
        log("first call", rec)
    log("chosen", results.get("chosen_configs"))
    log("wrote", path)


if __name__ == "__main__":
    main()
