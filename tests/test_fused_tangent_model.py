"""The model's tangent pass with the fused tangent kernels (forced on under the Triton interpreter)
against the PyTorch path and the float64 jvp oracle, on the tiny model.

fp32 model: fused = PyTorch to fp32 rounding. The student as trained (fp32 weights, bf16 autocast):
fused within bf16 rounding of the oracle and no further from it than the PyTorch path. Per-sample
times and per-token times (Wan2.2 TI2V, modulation [B, S, D]). The kernels are forward-only: a pass
autograd records never takes them.
"""

import contextlib

import pytest
import torch

from rcm_megatron.kernels import fused_ops as fused_ops_mod
from rcm_megatron.kernels import norm_modulate, pointwise, qk_norm_rope
from rcm_megatron.kernels.fused_ops import fused_ops
from rcm_megatron.models import WanDiT, preset

SHAPE = (2, 16, 2, 2, 4)  # 2 frames of 1 x 2 patches: 4 tokens per sample
TOKENS = 4
CFG = preset("tiny").replace(num_layers=1)  # the interpreter runs every kernel program in numpy: one block


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def inputs(per_token: bool):
    g = torch.Generator().manual_seed(7)
    x, x_tan = torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)
    tshape = (SHAPE[0], TOKENS) if per_token else (SHAPE[0],)
    t = torch.rand(*tshape, generator=g) * 1000
    t_tan = torch.randn(*tshape, generator=g) * 100
    if per_token:  # TI2V: the given first frame has time 0 and no time tangent
        t[:, :2], t_tan[:, :2] = 0.0, 0.0
    ctx = torch.randn(SHAPE[0], 3, 64, generator=g)
    return x, x_tan, t, t_tan, ctx


class Launches:
    """Counts the fused kernels' launches (each module's kernel object, wrapped)."""

    KERNELS = [(norm_modulate, "_norm_modulate_kernel"), (qk_norm_rope, "_qk_norm_rope_kernel"),
               (pointwise, "_gelu_tanh_kernel"), (pointwise, "_gated_residual_kernel")]

    def __init__(self, monkeypatch):
        self.counts = {}
        for module, name in self.KERNELS:
            kernel = getattr(module, name)
            monkeypatch.setattr(module, name, self._wrap(name, kernel))

    def _wrap(self, name, kernel):
        counts = self.counts

        class Counted:
            def __getitem__(self, grid):
                counts[name] = counts.get(name, 0) + 1
                return kernel[grid]
        return Counted()


@pytest.fixture(scope="module")
def oracle_model():
    model = WanDiT(CFG).double()
    model.reset_parameters(seed=2)
    return model


@pytest.mark.parametrize("per_token,precision", [
    pytest.param(False, "fp32", marks=pytest.mark.slow),
    pytest.param(True, "fp32", marks=pytest.mark.slow),
    pytest.param(False, "bf16 autocast", marks=pytest.mark.slow),
    pytest.param(True, "bf16 autocast", marks=pytest.mark.slow),
])
def test_fused_tangent_pass_matches_pytorch_and_oracle(per_token, precision, oracle_model, monkeypatch):
    x, x_tan, t, t_tan, ctx = inputs(per_token)
    y_ref, y_tan_ref = torch.func.jvp(lambda x, t: oracle_model(x, t, ctx.double()), (x.double(), t.double()),
                                      (x_tan.double(), t_tan.double()))
    y_ref, y_tan_ref = y_ref.detach(), y_tan_ref.detach()
    model = WanDiT(CFG)
    model.reset_parameters(seed=2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision != "fp32" else contextlib.nullcontext()
    with fused_ops("off"), autocast:
        y0, y0_tan = model.forward_with_tangent(x, t, ctx, x_tan, t_tan)
    launches = Launches(monkeypatch)
    with fused_ops("on"), autocast:
        y1, y1_tan = model.forward_with_tangent(x, t, ctx, x_tan, t_tan)
    layers = CFG.num_layers
    # per block: norm1+modulate, norm2, norm3+modulate; q, k norms (self), q norm (cross), k norm (text);
    # GELU; two gated residuals. Plus the head's norm+modulate.
    assert launches.counts == {"_norm_modulate_kernel": 3 * layers + 1, "_qk_norm_rope_kernel": 4 * layers,
                               "_gelu_tanh_kernel": layers, "_gated_residual_kernel": 2 * layers}, launches.counts
    if precision == "fp32":
        assert rel(y1, y0) < 1e-5 and rel(y1_tan, y0_tan) < 1e-5
        assert rel(y1, y_ref) < 1e-4 and rel(y1_tan, y_tan_ref) < 1e-4
    else:
        assert not torch.equal(y1_tan, y0_tan)  # the fused path ran (it rounds less often)
        for fused, pytorch, ref in ((y1, y0, y_ref), (y1_tan, y0_tan, y_tan_ref)):
            assert rel(fused, ref) < 3e-2, rel(fused, ref)
            assert rel(fused, ref) < 1.5 * rel(pytorch, ref) + 1e-3, (rel(fused, ref), rel(pytorch, ref))


def test_with_grad_passes_never_take_the_fused_kernels(monkeypatch):
    x, x_tan, t, t_tan, ctx = inputs(False)
    model = WanDiT(CFG)
    with fused_ops("off"):
        y0 = model(x, t, ctx)
    launches = Launches(monkeypatch)
    with fused_ops("on"):
        y1 = model(x, t, ctx)
    assert launches.counts == {} and torch.equal(y0, y1) and y1.requires_grad


def test_cpu_default_is_the_pytorch_path(monkeypatch):
    """auto mode on CPU tensors: the fp64 oracle tests and the toy run keep their numbers bit for bit."""
    x, x_tan, t, t_tan, ctx = inputs(False)
    model = WanDiT(CFG)
    monkeypatch.delenv("RCM_FUSED_TANGENT_OPS", raising=False)
    monkeypatch.setattr(fused_ops_mod, "_mode", ["auto"])  # the module's default, whatever ran before
    assert fused_ops_mod.fused_ops_mode() == "auto"
    launches = Launches(monkeypatch)
    y, y_tan = model.forward_with_tangent(x, t, ctx, x_tan, t_tan)
    assert launches.counts == {}
    with fused_ops("off"):
        y0, y0_tan = model.forward_with_tangent(x, t, ctx, x_tan, t_tan)
    assert torch.equal(y, y0) and torch.equal(y_tan, y0_tan)


def _tp_worker(full_state, x, x_tan, t, t_tan, ctx):
    """One TP rank: the fused q/k norm computes this rank's row sums, all-reduces them, then applies."""
    from rcm_megatron.parallel.sharding import load_full_state_dict

    model = WanDiT(CFG)
    load_full_state_dict(model, full_state)
    kernel, launches = qk_norm_rope._row_sums_kernel, []

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    qk_norm_rope._row_sums_kernel = Counted()
    try:
        with fused_ops("on"):
            return *model.forward_with_tangent(x, t, ctx, x_tan, t_tan), len(launches)
    finally:
        qk_norm_rope._row_sums_kernel = kernel


@pytest.mark.slow
def test_fused_tangent_pass_under_tensor_parallelism():
    """TP = 2 with sequence parallelism (gloo ranks, Triton interpreter) with the fused kernels: every rank's output and
    tangent equal the single-process fused pass in fp32 (the q/k norm's sums are all-reduced)."""
    from distributed_utils import run_distributed
    from rcm_megatron.parallel.config import ParallelConfig

    x, x_tan, t, t_tan, ctx = inputs(False)
    model = WanDiT(CFG)
    model.reset_parameters(seed=4)
    with fused_ops("on"):
        y, y_tan = model.forward_with_tangent(x, t, ctx, x_tan, t_tan)
    ranks = run_distributed(_tp_worker, 2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
                            model.state_dict(), x, x_tan, t, t_tan, ctx)
    for rank, (yr, yr_tan, row_sums_launches) in enumerate(ranks):
        assert row_sums_launches == 4 * CFG.num_layers  # every q/k norm took the split fused path
        assert rel(yr, y) < 1e-5 and rel(yr_tan, y_tan) < 1e-5, (rank, rel(yr, y), rel(yr_tan, y_tan))
