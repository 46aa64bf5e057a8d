#!/usr/bin/env python
"""The fused tangent kernels against the PyTorch ops they replace, at Wan-1.3B shapes, on one GPU.

Per op (LayerNorm + adaLN modulate, q/k RMSNorm + RoPE, GELU-tanh, gated residual, each primal and
tangent): time of the fused kernel and of the model's PyTorch path (``fused_ops("off")``), the
fused kernel's effective bandwidth (bytes it must move / time), and its relative error against
the PyTorch path computed in fp64 on the same inputs. Then the whole student tangent pass
(``forward_with_tangent``, fp32 weights under bf16 autocast as the trainer runs it, ``--layers``
blocks, one sample of 32,760 tokens) with the fused kernels and without them.

Writes ``fused_tangent_ops_<date>_<card>.json`` (card, date, command, versions) and prints a table.
About 1 minute on one H100/H200 (most of it building the model).

    python benchmarks/fused_tangent_ops.py --out benchmarks/results [--layers 30] [--compiled]
    python benchmarks/fused_tangent_ops.py --tiny --out /tmp/fused   # CPU: tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--layers", type=int, default=30, help="blocks in the whole-pass timing (0: skip it)")
    ap.add_argument("--compiled", action="store_true", help="also time the pass with compiled blocks (compiles: ~1 min)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a test of this script, no timing value)")
    args = ap.parse_args(argv)
    if args.layers < 0:
        ap.error(f"--layers must be >= 0, got {args.layers}")
    return args


def timed_ms(fn, reps: int) -> float:
    import torch

    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def op_cases(dev, tiny: bool):
    """(name, fused fn, PyTorch fn, fp64 PyTorch fn, bytes the op must move) at the model's shapes."""
    import torch

    from rcm_megatron.kernels import norm_modulate as nm
    from rcm_megatron.kernels import pointwise as pw
    from rcm_megatron.kernels import qk_norm_rope as qk
    from rcm_megatron.models import layers
    from rcm_megatron.models.rope import apply_rope, rope_cos_sin

    B, S, D, F, H = (1, 24, 64, 160, 4) if tiny else (1, 32760, 1536, 8960, 12)
    hd = D // H
    bf, f32 = torch.bfloat16, torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)

    x, x_tan = rnd(B, S, D), rnd(B, S, D)
    mod = rnd(B, 6, D, dtype=f32).unsqueeze(2).unbind(1)
    mod_tan = rnd(B, 6, D, dtype=f32).unsqueeze(2).unbind(1)
    w = rnd(D, dtype=f32)
    grid = (2, 3, S // 6) if tiny else (21, 30, 52)
    cos, sin = rope_cos_sin(grid, hd, device=dev, dtype=f32)
    u, u_tan = rnd(B, S, F), rnd(B, S, F)
    a, a_tan = rnd(B, S, D), rnd(B, S, D)
    e = 2  # bytes of a bf16 element

    def ln_mod(x, x_tan, sh, sh_t, sc, sc_t):
        n, n_tan = layers.layer_norm(x, x_tan, 1e-6)
        y, y_tan = layers.modulate(n, n_tan, sh, sh_t, sc, sc_t)
        return y.to(x.dtype), y_tan.to(x.dtype)

    def rms_rope(x, x_tan, cos, sin):
        y, y_tan = layers.rms_norm_across_heads(x, x_tan, w, 1e-6, D)
        rot = [apply_rope(t.unflatten(-1, (H, hd)), cos, sin).flatten(-2) for t in (y, y_tan)]
        return rot[0], rot[1]

    d64 = lambda *ts: [t.double() for t in ts]  # noqa: E731
    return B * S, [
        ("layernorm + modulate", lambda: nm.norm_modulate(x, x_tan, 1e-6, mod[0], mod_tan[0], mod[1], mod_tan[1]),
         lambda: ln_mod(x, x_tan, mod[0], mod_tan[0], mod[1], mod_tan[1]),
         lambda: ln_mod(*d64(x, x_tan, mod[0], mod_tan[0], mod[1], mod_tan[1])), 4 * B * S * D * e),
        ("q/k rmsnorm + rope", lambda: qk.qk_norm_rope(x, x_tan, w, 1e-6, (cos, sin)),
         lambda: rms_rope(x, x_tan, cos, sin), lambda: rms_rope(*d64(x, x_tan, cos, sin)), 4 * B * S * D * e),
        ("gelu-tanh", lambda: pw.gelu_tanh(u, u_tan), lambda: layers.gelu_tanh(u, u_tan),
         lambda: layers.gelu_tanh(*d64(u, u_tan)), 4 * B * S * F * e),
        ("gated residual", lambda: pw.gated_residual(x, x_tan, a, a_tan, mod[2], mod_tan[2]),
         lambda: layers.gated_residual(x, x_tan, a, a_tan, mod[2], mod_tan[2]),
         lambda: layers.gated_residual(*d64(x, x_tan, a, a_tan, mod[2], mod_tan[2])), 6 * B * S * D * e),
    ]


def pytorch_path(fn):
    """fn with the fused kernels off: the model's layers dispatch to them under no_grad on CUDA."""
    from rcm_megatron.kernels.fused_ops import fused_ops

    def run():
        with fused_ops("off"):
            return fn()
    return run


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> int:
    args = parse(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from rcm_megatron.kernels.fused_ops import fused_ops

    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    reps = 1 if args.tiny else 20
    rows = []
    with torch.no_grad():
        tokens, cases = op_cases(dev, args.tiny)
        for name, fused, pytorch, exact, nbytes in cases:
            pytorch, exact = pytorch_path(pytorch), pytorch_path(exact)
            ref = exact()
            err = max(rel(f, r) for f, r in zip(fused(), ref))
            err_pt = max(rel(p, r) for p, r in zip(pytorch(), ref))
            ms_f, ms_p = timed_ms(fused, reps), timed_ms(pytorch, reps)
            rows.append({"op": name, "fused_ms": ms_f, "pytorch_ms": ms_p, "speedup": ms_p / ms_f,
                         "fused_gb_per_s": nbytes / ms_f / 1e6, "fused_rel_err_vs_fp64": err,
                         "pytorch_rel_err_vs_fp64": err_pt})
        passes = {}
        if args.layers:
            from rcm_megatron.models import WanDiT, preset

            cfg = preset("tiny").replace(num_layers=1) if args.tiny else preset("wan-1.3b").replace(num_layers=args.layers)
            latent = (16, 2, 4, 6) if args.tiny else (16, 21, 60, 104)
            model = WanDiT(cfg).to(dev)
            x = torch.randn(1, *latent, device=dev)
            ctx = torch.randn(1, 16 if args.tiny else 512, cfg.text_dim, device=dev)
            t, t_tan = torch.tensor([500.0], device=dev), torch.tensor([30.0], device=dev)
            out = {}
            for mode in ("on" if args.tiny else "auto", "off"):
                def run():
                    with fused_ops(mode), torch.autocast(dev, dtype=torch.bfloat16):
                        out[mode] = model.forward_with_tangent(x, t, ctx, x, t_tan)
                passes[f"tangent pass, fused ops {mode}"] = timed_ms(run, 1 if args.tiny else 3)
            a, b = out["on" if args.tiny else "auto"], out["off"]
            passes["fused vs PyTorch: rel diff of v, dv"] = [rel(a[0], b[0]), rel(a[1], b[1])]
            if args.compiled and dev == "cuda":
                model.compile_blocks()
                passes["tangent pass, compiled blocks"] = timed_ms(run, 3)  # mode "off": compiled code either way
    now = _dt.datetime.now(_dt.timezone.utc)
    import triton

    result = {"card": card, "date": now.isoformat(), "torch": torch.__version__, "triton": triton.__version__,
              "command": "python benchmarks/fused_tangent_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "tokens": tokens, "ops": rows, "whole_pass_ms": passes, "layers": args.layers}
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()
    path = os.path.join(args.out, f"fused_tangent_ops_{now:%Y%m%dT%H%M%SZ}_{slug}.json")
    json.dump(result, open(path, "w"), indent=1)
    print(f"fused tangent ops on {card}, {tokens} tokens ({os.path.relpath(path, ROOT)})")
    print(f"{'op':22s} {'fused ms':>9s} {'torch ms':>9s} {'speedup':>7s} {'GB/s':>7s} {'err fused':>9s} {'err torch':>9s}")
    for r in rows:
        print(f"{r['op']:22s} {r['fused_ms']:9.3f} {r['pytorch_ms']:9.3f} {r['speedup']:7.2f} {r['fused_gb_per_s']:7.0f} "
              f"{r['fused_rel_err_vs_fp64']:9.2e} {r['pytorch_rel_err_vs_fp64']:9.2e}")
    for k, v in passes.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
