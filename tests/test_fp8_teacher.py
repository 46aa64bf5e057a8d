"""--fp8-teacher: the frozen teacher's block linears in FP8 (e4m3, row-wise scales, torch._scaled_mm).

- the quantized product against float64 arithmetic: on the quantized values (exact up to the output's
  rounding) and on the original ones within the e4m3 rounding bound, element by element;
- the whole teacher against the unquantized one, which linears are quantized, primal no-grad only,
  nothing FP8 in its state dict;
- TP = 2 (with and without sequence parallelism) on gloo ranks against the TP = 1 FP8 teacher;
- two-expert routing with FP8 experts; the memory planner's teacher bytes against a built model;
- pretrain_rcm.py with --fp8-teacher (a tiny run, and the flag refusals, exit 2 with one line);
- --first-last-layers-bf16: which blocks stay out of FP8 (whole-network index, pipeline stages, experts, TP = 2,
  the planner), and that it cuts the shipped toy teacher's FP8 error at low and high noise.
"""

import dataclasses
import json
import os

import pytest
import torch

from distributed_utils import run_distributed
from rcm_megatron.kernels.fp8 import FP8_MAX, fp8_linear, fp8_teacher_flag_error, quantize_rows
from rcm_megatron.models import WanDiT, WanExperts, preset
from rcm_megatron.parallel.config import ParallelConfig

U = 2.0 ** -4  # e4m3 unit roundoff (3 mantissa bits, round to nearest)
SUB = 2.0 ** -10  # half the subnormal spacing 2^-9: the absolute rounding error below 2^-6 (in units of the scale)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-2, 2, 64)  # columns of very different scale
    x[1] *= 1e-3  # and rows
    w = torch.randn(48, 64, generator=g) * torch.logspace(-1, 1, 48)[:, None]
    return x, w, torch.randn(48, generator=g)


def test_product_against_float64():
    x, w, b = _operands()
    wq, ws = quantize_rows(w)
    assert wq.dtype == torch.float8_e4m3fn and ws.shape == (48, 1) and ws.dtype == torch.float32
    assert (wq.float().abs().amax(dim=1) == FP8_MAX).all()  # each row uses the full range
    x2 = x.reshape(-1, 64).double()
    exact = x2 @ w.double().t() + b.double()
    for dtype, out_rounding in ((torch.float32, 2.0 ** -24), (torch.bfloat16, 2.0 ** -8)):
        y = fp8_linear(x.to(dtype), wq, ws, b)
        assert y.dtype == dtype and y.shape == (3, 5, 48)
        xq, xs = quantize_rows(x.to(dtype).reshape(-1, 64))
        xd, wd = xq.double() * xs.double(), wq.double() * ws.double()
        on_quantized = xd @ wd.t() + b.double()
        accumulation = 64 * 2.0 ** -24 * (xd.abs() @ wd.abs().t() + b.double().abs())  # fp32 sums of K = 64 terms
        err = (y.reshape(-1, 48).double() - on_quantized).abs()
        # rounding of the product, of the bias to the output dtype, and of their sum
        rounding = out_rounding * ((xd @ wd.t()).abs() + b.double().abs() + on_quantized.abs()) * 1.01
        assert (err <= rounding + accumulation).all(), dtype  # the FP8 product itself is exact
    # The quantization error, element by element, within e4m3's rounding of every operand:
    # |x w - q(x) q(w)| <= (|x| + ex)(|w| + ew) - |x||w|, e = U |v| + SUB * (row scale).
    y = fp8_linear(x, wq, ws, b).reshape(-1, 48).double()
    xs = quantize_rows(x.reshape(-1, 64))[1].double()
    ex, ew = U * x2.abs() + SUB * xs, U * w.double().abs() + SUB * ws.double()
    bound = (x2.abs() + ex) @ (w.double().abs() + ew).t() - x2.abs() @ w.double().abs().t()
    assert ((y - exact).abs() <= bound * (1 + 1e-5) + 1e-6).all()
    assert 1e-3 < rel(y, exact) < 0.05  # errors of ~U per element average out over K = 64


def test_quantizing_a_zero_row_and_refusing_grad():
    w = torch.zeros(16, 32)
    w[1, 3] = 2.0
    wq, ws = quantize_rows(w)
    assert torch.isfinite(ws).all() and (wq[0].float() == 0).all() and wq[1, 3].float() == FP8_MAX
    x = torch.randn(4, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="no-grad passes only"):
        fp8_linear(x, wq, ws)
    with torch.no_grad():
        torch.testing.assert_close(fp8_linear(x, wq, ws)[:, 1], 2.0 * quantize_rows(x)[0][:, 3].float()
                                   * quantize_rows(x)[1][:, 0])


def _inputs(cfg, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cfg.in_channels, 2, 4, 6, generator=g), torch.tensor([200.0, 800.0][:b]),
            torch.randn(b, 7, cfg.text_dim, generator=g))


def test_fp8_teacher_against_the_full_teacher():
    cfg = preset("tiny")
    ref, q = WanDiT(cfg).eval(), WanDiT(cfg).eval()
    full_bytes = sum(p.numel() * p.element_size() for p in q.parameters())
    n = q.quantize_fp8()
    quantized = sorted(name.rsplit(".", 1)[0] for name, b in q.named_buffers() if b is not None and b.dtype == torch.float8_e4m3fn)
    per_block = ["attn1.to_k", "attn1.to_out", "attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out", "attn2.to_q",
                 "attn2.to_v", "ffn.fc1", "ffn.fc2"]
    assert n == len(quantized) and quantized == sorted(f"blocks.{i}.{m}" for i in range(cfg.num_layers) for m in per_block)
    assert q.text_embedding.linear_1.weight is not None and q.proj_out.weight is not None  # embeddings, head: as they were
    lin = q.blocks["0"].ffn.fc1
    assert lin.weight is None and lin.weight_fp8.shape == (cfg.ffn_hidden_size, cfg.hidden_size)
    now = sum(t.numel() * t.element_size() for t in [*q.parameters(), *q.buffers()] if t is not None)
    fp8 = [b for b in q.buffers() if b is not None and b.dtype == torch.float8_e4m3fn]
    assert now == full_bytes - sum(3 * b.numel() - 4 * b.shape[0] for b in fp8)  # fp32 -> 1 byte + a scale per row
    # Never saved: the state dict holds no FP8 tensor (and no weight of a quantized linear)
    sd = q.state_dict()
    assert not any(v.dtype == torch.float8_e4m3fn for v in sd.values()) and "blocks.0.ffn.fc1.weight" not in sd
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        v_ref, v = ref(x, t, ctx), q(x, t, ctx)
    assert v.dtype == torch.float32 and 1e-3 < rel(v, v_ref) < 0.05
    # a bf16 teacher under autocast, as the trainer builds and runs it with --bf16 (to_dtype, then quantize)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        b16 = WanDiT(cfg).eval().to_dtype(torch.bfloat16)
        b16.quantize_fp8()
        assert 1e-3 < rel(b16(x, t, ctx), v_ref) < 0.05
    with pytest.raises(RuntimeError, match="no tangent pass"):
        q.forward_with_tangent(x, t, ctx, x, torch.ones(2))


def test_fp8_experts_route_per_sample():
    cfg = preset("tiny")
    experts = WanExperts.build(cfg, 0.5, seed=3).eval()
    for m in (experts.high_noise, experts.low_noise):
        assert m.quantize_fp8() == 10 * cfg.num_layers
    x, t, ctx = _inputs(cfg)  # t = 200 (low-noise expert), 800 (high-noise expert)
    with torch.no_grad():
        v = experts(x, t, ctx)
        torch.testing.assert_close(v[1:], experts.high_noise(x[1:], t[1:], ctx[1:]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v[:1], experts.low_noise(x[:1], t[:1], ctx[:1]), rtol=1e-5, atol=1e-6)


def _full_state(cfg):
    m = WanDiT(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.state_dict()


def _tp_worker(full_state, inputs):
    from rcm_megatron.parallel import state
    from rcm_megatron.parallel.sharding import load_full_state_dict

    m = WanDiT(preset("tiny")).eval()
    load_full_state_dict(m, full_state)
    m.quantize_fp8()
    fc1, fc2 = m.blocks["0"].ffn.fc1, m.blocks["0"].ffn.fc2
    with torch.no_grad():
        v = m(*inputs)
    return {"v": v, "rank": state.tensor_parallel_rank(), "fc1": (fc1.weight_fp8.float(), fc1.weight_scale),
            "fc2_scale": fc2.weight_scale}


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_fp8_teacher_equals_tp1(sp):
    cfg = preset("tiny")
    full = _full_state(cfg)
    inputs = _inputs(cfg)
    ref = WanDiT(cfg).eval()
    ref.load_state_dict(full)
    with torch.no_grad():
        v_full = ref(*inputs)
        ref.quantize_fp8()
        v1 = ref(*inputs)
    fc1, fc2 = ref.blocks["0"].ffn.fc1, ref.blocks["0"].ffn.fc2
    ranks = run_distributed(_tp_worker, 2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sp), full, inputs)
    e1 = rel(v1, v_full)
    for out in ranks:
        r = out["rank"]
        # a column-parallel shard holds whole output rows: exactly the TP = 1 quantization's rows
        rows = slice(r * cfg.ffn_hidden_size // 2, (r + 1) * cfg.ffn_hidden_size // 2)
        assert torch.equal(out["fc1"][0], fc1.weight_fp8.float()[rows]) and torch.equal(out["fc1"][1], fc1.weight_scale[rows])
        # a row-parallel shard quantizes its slice of each row on its own: finer scales, never coarser
        assert (out["fc2_scale"] <= fc2.weight_scale * (1 + 1e-6)).all() and not torch.equal(out["fc2_scale"], fc2.weight_scale)
        # the output: the TP = 1 FP8 teacher's, up to the row-parallel shards' own quantization
        e2 = rel(out["v"], v_full)
        assert e2 < 1.5 * e1 and rel(out["v"], v1) < 1.5 * e1, (e1, e2, rel(out["v"], v1))
    torch.testing.assert_close(ranks[0]["v"], ranks[1]["v"], rtol=0, atol=0)  # replicated output


def test_planner_counts_the_fp8_teacher_bytes():
    from rcm_megatron.planning.layout import Layout, Workload
    from rcm_megatron.planning.memory import model_states

    cfg = preset("tiny")
    lay = Layout(tp=1, cp=1, pp=1, dp=1)
    for bf16 in (False, True):
        planned = {fp8: model_states(Workload(cfg, (16, 2, 4, 4), text_len=8, bf16=bf16, fp8_teacher=fp8), lay)[0]["teacher"]
                   for fp8 in (False, True)}
        m = WanDiT(cfg)
        if bf16:
            m.to_dtype(torch.bfloat16)
        built = {False: sum(p.numel() * p.element_size() for p in m.parameters())}
        m.quantize_fp8()
        built[True] = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()] if t is not None)
        assert planned == built, (bf16, planned, built)


def test_fp8_teacher_flag_errors():
    assert fp8_teacher_flag_error("distill", False, None) is None
    assert fp8_teacher_flag_error("distill", False, (9, 0)) is None
    assert "--mode teacher" in fp8_teacher_flag_error("teacher", False, None)
    assert "--use-torch-fsdp2" in fp8_teacher_flag_error("distill", True, None)
    assert "capability >= 8.9" in fp8_teacher_flag_error("distill", False, (8, 0))


def test_pretrain_refuses_fp8_teacher_in_teacher_mode(tmp_path, capsys):
    import pretrain_rcm

    rc = pretrain_rcm.main(["--model", "tiny", "--device", "cpu", "--mode", "teacher", "--fp8-teacher",
                            "--train-iters", "1", "--log-dir", str(tmp_path / "log")])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "--fp8-teacher" in lines[0] and "--mode teacher" in lines[0], lines
    assert not os.path.exists(tmp_path / "log" / "metrics.jsonl")


@pytest.mark.slow
def test_tiny_training_run_with_fp8_teacher(tmp_path):
    import pretrain_rcm

    def run(name, *extra):
        flags = ["--model", "tiny", "--device", "cpu", "--micro-batch-size", "2", "--train-iters", "3",
                 "--student-update-freq", "3", "--rollout-max-steps", "2", "--log-interval", "1",
                 "--log-dir", str(tmp_path / name), "--save", str(tmp_path / name / "ckpt"), *extra]
        assert pretrain_rcm.main(flags) == 0
        return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]

    fp8, full = run("fp8", "--fp8-teacher"), run("full")
    # the tiny model has 2 blocks: --first-last-layers-bf16 keeps both out of FP8, so the full teacher's losses
    assert [r["loss"] for r in run("kept", "--fp8-teacher", "--first-last-layers-bf16")] == [r["loss"] for r in full]
    assert [r["phase"] for r in fp8] == ["critic", "critic", "student"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in fp8)
    assert [r["loss"] for r in fp8[:2]] == [r["loss"] for r in full[:2]]  # critic steps do not call the teacher
    # the student step saw the FP8 teacher: close to the full teacher's losses, not equal
    s8, s = fp8[2], full[2]
    for k in ("loss_scm", "loss_dmd"):
        assert s8[k] != s[k] and abs(s8[k] - s[k]) < 0.1 * abs(s[k]), (k, s8[k], s[k])
    # the checkpoint holds no FP8 tensor (the teacher is never saved; its weights stay full precision on disk)
    from torch.distributed.checkpoint import FileSystemReader

    (it,) = [d for d in os.listdir(tmp_path / "fp8" / "ckpt") if d.startswith("iter_")]
    meta = FileSystemReader(str(tmp_path / "fp8" / "ckpt" / it)).read_metadata().state_dict_metadata
    dtypes = {getattr(getattr(m, "properties", None), "dtype", None) for m in meta.values()}
    assert torch.float32 in dtypes and torch.float8_e4m3fn not in dtypes
    assert not any("weight_fp8" in k or "weight_scale" in k for k in meta)


@pytest.mark.slow
def test_numerics_benchmark_fp8_mode(tmp_path):
    import glob
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("numerics_bench", os.path.join(root, "benchmarks", "numerics.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--fp8-teacher", "--out", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "numerics_*.json"))
    result = json.load(open(path))
    rows = result["relative_l2_error_vs_fp32"]
    assert result["mode"] == "fp8 teacher" and list(rows) == ["teacher fp8, fp32 activations", "teacher bf16", "teacher fp8"]
    assert 1e-4 < rows["teacher bf16"]["v"] < rows["teacher fp8, fp32 activations"]["v"] < 0.1  # FP8 above bf16 rounding
    assert rows["teacher fp8"]["v vs bf16"] > rows["teacher bf16"]["v"]
    for row in rows.values():
        assert 0 < row["g"] < row["F"] and 0 < row["g direction"] < 2 * row["g"]  # g moves less than F_T


@pytest.mark.slow
def test_rcm_step_benchmark_reports_fp8_teacher_passes_apart(tmp_path):
    import glob
    import importlib.util

    from rcm_megatron.training.throughput import wan_forward_flops

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("rcm_step_bench", os.path.join(root, "benchmarks", "rcm_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--out", str(tmp_path), "--", "--fp8-teacher"]) == 0
    (path,) = glob.glob(str(tmp_path / "rcm_step_*.json"))
    r = json.load(open(path))
    assert r["fp8_teacher"] is True and r["card"] == "cpu" and "--fp8-teacher" in r["pretrain_flags"]
    fp8_passes = {p["pass"] for p in r["passes"] if p["precision"] == "fp8"}
    assert fp8_passes == {"teacher CFG (sCM)", "teacher CFG (DMD)"}
    assert {p["precision"] for p in r["passes"] if p["pass"] not in fp8_passes} == {"fp32"}
    # the student step (iteration 6) ran the teacher twice with CFG on micro-batch 2: 8 sample-forwards in FP8
    total = wan_forward_flops(preset("tiny"), r["tokens"], r["text_len"]).total
    by_it = {i["iteration"]: i for i in r["iterations"]}
    assert by_it[6]["fp8_teacher_flops"] == pytest.approx(8 * total) and by_it[6]["fp8_teacher_seconds"] > 0
    assert all(i["fp8_teacher_flops"] == 0 for n, i in by_it.items() if n != 6)  # critic steps: no teacher
    summary = r["fp8_teacher_passes"]
    assert summary["seconds"] == pytest.approx(by_it[6]["fp8_teacher_seconds"])
    assert summary["model_tflops"] == pytest.approx(8 * total / summary["seconds"] / 1e12)
    bf16 = sum(i["bf16_flops"] for i in r["iterations"]) / (r["period_seconds"] - summary["seconds"]) / 1e12
    assert r["period_bf16_model_tflops_per_gpu"] == pytest.approx(bf16)


def test_output_dtype_follows_autocast_like_f_linear():
    wq, ws = quantize_rows(torch.randn(32, 64))
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8_linear(x, wq, ws).dtype == torch.nn.functional.linear(x, torch.randn(32, 64)).dtype == torch.bfloat16
    assert fp8_linear(x, wq, ws).dtype == torch.float32 and fp8_linear(x.bfloat16(), wq, ws).dtype == torch.bfloat16


def _quantized_blocks(m) -> set[str]:
    out = set()
    for key, block in m.blocks.items():
        fp8 = {lin.weight_fp8 is not None for lin in block.modules() if hasattr(lin, "weight_fp8")}
        assert len(fp8) == 1, key  # a block is quantized whole or not at all
        if fp8.pop():
            out.add(key)
    return out


def test_first_last_layers_stay_out_of_fp8():
    cfg = dataclasses.replace(preset("tiny"), num_layers=4)
    m = WanDiT(cfg).eval()
    assert m.quantize_fp8(1, 1) == 20 and _quantized_blocks(m) == {"1", "2"}
    assert m.blocks["0"].ffn.fc1.weight is not None and m.blocks["3"].attn1.to_out.weight is not None
    assert WanDiT(cfg).quantize_fp8(2, 0) == 20  # the counts as Megatron-LM's --num-layers-at-start/end-in-bf16
    # a pipeline stage counts blocks of the whole network: the stage of blocks 2-3 keeps block 3 only
    stage = WanDiT(cfg, pre_process=False, layer_range=(2, 4)).eval()
    assert stage.quantize_fp8(1, 1) == 10 and _quantized_blocks(stage) == {"2"}
    first = WanDiT(cfg, post_process=False, layer_range=(0, 2)).eval()
    assert first.quantize_fp8(1, 1) == 10 and _quantized_blocks(first) == {"1"}
    # each expert of a two-expert teacher keeps its own first and last block
    experts = WanExperts.build(dataclasses.replace(cfg, num_layers=3), 0.5, seed=3).eval()
    for e in (experts.high_noise, experts.low_noise):
        assert e.quantize_fp8(1, 1) == 10 and _quantized_blocks(e) == {"1"}
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, t, ctx)[1:], experts.high_noise(x[1:], t[1:], ctx[1:]), rtol=1e-5, atol=1e-6)


def test_first_last_layers_cut_the_toy_teachers_fp8_error():
    """The shipped toy teacher (4 blocks): its first and last block carry most of the FP8 error at low noise
    (t = 50, block 0) and high noise (the last block); kept out of FP8, the error drops by a quarter or more
    (benchmarks/toy_fp8_teacher_quality.py measures it by linear and block on 256 videos)."""
    import copy

    from rcm_megatron.checkpointing.loading import open_model
    from rcm_megatron.data.toy import ToyVideoLatents

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full, _ = open_model(os.path.join(root, "assets", "toy_teacher.pt"))
    full.eval()
    all_fp8, kept = copy.deepcopy(full), copy.deepcopy(full)
    assert all_fp8.quantize_fp8() == 40 and kept.quantize_fp8(1, 1) == 20
    ds = ToyVideoLatents(seed=0)
    items = [ds[i] for i in range(64)]
    x0, ctx = torch.stack([d["latents"] for d in items]), torch.stack([d["context"] for d in items])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tt in (50, 950):
            s = tt / 1000
            xt, t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g), torch.full((len(items),), float(tt))
            v = full(xt, t, ctx)
            e_all, e_kept = rel(all_fp8(xt, t, ctx), v), rel(kept(xt, t, ctx), v)
            assert e_kept < 0.8 * e_all, (tt, e_kept, e_all)


def _tp_kept_worker(cfg, full_state, inputs):
    from rcm_megatron.parallel.sharding import load_full_state_dict

    m = WanDiT(cfg).eval()
    load_full_state_dict(m, full_state)
    n = m.quantize_fp8(1, 1)
    with torch.no_grad():
        return {"v": m(*inputs), "n": n, "quantized": _quantized_blocks(m)}


@pytest.mark.slow
def test_tensor_parallel_first_last_layers_bf16():
    cfg = dataclasses.replace(preset("tiny"), num_layers=3)
    full = _full_state(cfg)
    inputs = _inputs(cfg)
    ref = WanDiT(cfg).eval()
    ref.load_state_dict(full)
    with torch.no_grad():
        v_full = ref(*inputs)
        ref.quantize_fp8(1, 1)
        v1 = ref(*inputs)
    ranks = run_distributed(_tp_kept_worker, 2, ParallelConfig(tensor_model_parallel_size=2), cfg, full, inputs)
    e1 = rel(v1, v_full)
    assert e1 > 1e-4  # block 1 is in FP8
    for out in ranks:  # each rank keeps the same blocks and quantizes its own shard of block 1
        assert out["n"] == 10 and out["quantized"] == {"1"}
        assert rel(out["v"], v_full) < 1.5 * e1 and rel(out["v"], v1) < 1.5 * e1
    torch.testing.assert_close(ranks[0]["v"], ranks[1]["v"], rtol=0, atol=0)


def test_planner_counts_first_last_layers_bf16():
    from rcm_megatron.planning.layout import Layout, Workload
    from rcm_megatron.planning.memory import model_states

    cfg = dataclasses.replace(preset("tiny"), num_layers=3)
    for bf16 in (False, True):
        planned = model_states(Workload(cfg, (16, 2, 4, 4), text_len=8, bf16=bf16, fp8_teacher=True,
                                        first_last_layers_bf16=True), Layout(tp=1, cp=1, pp=1, dp=1))[0]["teacher"]
        m = WanDiT(cfg)
        if bf16:
            m.to_dtype(torch.bfloat16)
        m.quantize_fp8(1, 1)
        assert planned == sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()] if t is not None)


def test_pretrain_refuses_first_last_layers_bf16_without_fp8_teacher(tmp_path, capsys):
    import pretrain_rcm

    rc = pretrain_rcm.main(["--model", "tiny", "--device", "cpu", "--first-last-layers-bf16",
                            "--train-iters", "1", "--log-dir", str(tmp_path / "log")])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "--first-last-layers-bf16" in lines[0] and "add --fp8-teacher" in lines[0], lines
    assert not os.path.exists(tmp_path / "log" / "metrics.jsonl")
