"""Regional torch.compile of the DiT blocks (``--compile-blocks``, on by default on CUDA): the
compiled blocks give the eager outputs, tangents and gradients, and compile a bounded number of
graphs (a guard on tensor storage once made every call recompile until dynamo gave up)."""

import pytest
import torch

from rcm_megatron.models import WanDiT, preset


@pytest.mark.slow
def test_compiled_blocks_equal_eager_and_do_not_recompile_per_call():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = preset("tiny")
    torch.manual_seed(0)
    x, t = torch.randn(2, 16, 2, 4, 4), torch.tensor([300.0, 700.0])
    ctx = torch.randn(2, 5, cfg.text_dim)
    outs = []
    for compiled in (False, True):
        net = WanDiT(cfg)
        net.set_activation_recompute(1)
        if compiled:
            net.compile_blocks()
        for _ in range(2):  # a second call must reuse the compiled code
            net.zero_grad(set_to_none=True)
            with torch.no_grad():
                v, tv = net.forward_with_tangent(x, t, ctx, x, torch.ones(2))
            y = net(x, t, ctx)
            y.square().sum().backward()
        outs.append((v, tv, y.detach(), [p.grad for p in net.parameters()]))
    (v0, tv0, y0, g0), (v1, tv1, y1, g1) = outs
    for a, b in ((v0, v1), (tv0, tv1), (y0, y1), *zip(g0, g1)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # graphs: tangent (split around the fused kernel) + with-grad; no per-call recompiles
    assert 0 < counters["stats"]["unique_graphs"] <= 12, dict(counters["stats"])
