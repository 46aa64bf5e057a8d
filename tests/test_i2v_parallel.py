"""Image-to-video models under tensor, sequence and context parallelism against the
single-process float64 oracle.

Wan2.1 I2V (image tokens through the added K/V of cross-attention, tangent on the noisy
channels only) and Wan2.2 TI2V (per-token timesteps, split over CP and SP like the tokens)
on TP2 x CP2 gloo ranks, SP off and on, ring and all-to-all: outputs, tangents (jvp oracle),
the regression loss and every parameter's gradient after the trainer's DP x CP sum. 18 and
15 tokens leave padded chunks and shards.
"""

import pytest
import torch

from distributed_utils import run_distributed
from test_tensor_parallel import _loss, rel
from rcm_megatron.models import WanDiT, expand_timesteps, preset
from rcm_megatron.parallel.config import ParallelConfig

D = torch.float64
KINDS = {"i2v": preset("tiny").replace(in_channels=36, out_channels=16, image_dim=48),
         "ti2v": preset("tiny").replace(in_channels=48, out_channels=48)}
SHAPES = [(2, 3, 4, 6), (1, 1, 6, 10)]  # (batch, frames, h, w): 18 and 15 tokens


def _inputs(kind, b, f, h, w, seed):
    cfg = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    shape = (b, cfg.in_channels, f, h, w)
    t = torch.rand(b, generator=g, dtype=D) * 1000
    tt = torch.randn(b, generator=g, dtype=D)
    c = dict(x=torch.randn(shape, generator=g, dtype=D), ctx=torch.randn(b, 7, 64, generator=g, dtype=D),
             tx=torch.randn(b, cfg.out_channels, f, h, w, generator=g, dtype=D),
             target=torch.randn(b, cfg.out_channels, f, h, w, generator=g, dtype=D),
             img=torch.randn(b, 5, 48, generator=g, dtype=D) if kind == "i2v" else None)
    grid = (f, h // 2, w // 2)
    c["t"], c["tt"] = (expand_timesteps(t, grid), expand_timesteps(tt, grid)) if kind == "ti2v" else (t, tt)
    return c


def _passes(model, c):
    model.zero_grad(set_to_none=True)
    y = model(c["x"], c["t"], c["ctx"], image_context=c["img"])
    loss = _loss(y, c["target"])
    loss.backward()
    yt, ty = model.forward_with_tangent(c["x"], c["t"], c["ctx"], c["tx"], c["tt"], image_context=c["img"])
    return y.detach(), loss.detach(), yt, ty


def _state(kind):
    model = WanDiT(KINDS[kind]).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=D))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def oracle():
    refs = {}
    for kind, cfg in KINDS.items():
        state = _state(kind)
        model = WanDiT(cfg).double()
        model.load_state_dict(state)
        cases = []
        for i, shape in enumerate(SHAPES):
            c = _inputs(kind, *shape, seed=300 + i)
            y, loss, _, _ = _passes(model, c)
            noisy = cfg.out_channels
            _, ty = torch.func.jvp(
                lambda x, t: model(torch.cat([x, c["x"][:, noisy:]], 1), t, c["ctx"], image_context=c["img"]),
                (c["x"][:, :noisy], c["t"]), (c["tx"], c["tt"]))
            cases.append(dict(inp=c, y=y, loss=loss, ty=ty.detach(),
                              grads={n: p.grad.clone() for n, p in model.named_parameters()}))
        refs[kind] = (state, cases)
    return refs


def _layout_worker(refs, comm_types, sp_modes):
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from rcm_megatron.parallel import state
    from rcm_megatron.parallel.sharding import gather_state_dict, load_full_state_dict

    grad_group = mpu.get_data_parallel_group(with_context_parallel=True)
    errors = {}
    for kind, (full_state, cases) in refs.items():
        model = WanDiT(KINDS[kind]).double()
        load_full_state_dict(model, full_state)
        for comm in comm_types:
            state.set_context_parallel_comm_type(comm)
            for sp in sp_modes:
                state.set_sequence_parallel(sp)
                for i, ref in enumerate(cases):
                    y, loss, yt, ty = _passes(model, ref["inp"])
                    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                    for g in grads.values():
                        dist.all_reduce(g, group=grad_group)
                    grads = gather_state_dict(model, grads)
                    worst = max((rel(grads[n], g), n) for n, g in ref["grads"].items())
                    errors[(kind, comm, sp, i)] = {"y": rel(y, ref["y"]), "yt": rel(yt, ref["y"]),
                                                   "ty": rel(ty, ref["ty"]), "loss": rel(loss, ref["loss"]),
                                                   "grad": worst[0], "grad_name": worst[1]}
    state.set_sequence_parallel(False)
    return errors


@pytest.mark.slow
def test_i2v_and_per_token_times_under_tp_sp_cp(oracle):
    cfg = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2, cp_comm_type="p2p")
    ranks = run_distributed(_layout_worker, 4, cfg, oracle, ("p2p", "a2a"), (False, True))
    for rank, errors in enumerate(ranks):
        assert len(errors) == len(KINDS) * 2 * 2 * len(SHAPES)
        for key, err in errors.items():
            for q in ("y", "yt", "ty", "loss", "grad"):
                assert err[q] <= 1e-10, f"rank {rank} {key}: {q} off by {err[q]:.2e} ({err['grad_name']})"
