"""The pre-build GPU memory check plans the shape of the samples trained on: with --data shards,
the latent shape and text length of the shards' metadata, not --latent-shape's 480p default (a
small-shape dataset must not be refused for a 480p plan, nor a 480p one pass on a small plan)."""

import dataclasses
import os

import torch

from rcm_megatron.data.shards import ShardWriter, shard_name, write_dataset_meta, write_negative_context
from rcm_megatron.models.config import preset
from rcm_megatron.planning.search import check_fits
from rcm_megatron.training import preflight as pf
from rcm_megatron.training.arguments import parse_args

SHAPE, TEXT_LEN = (16, 2, 4, 4), 6


def _shards(root, text_dim: int) -> str:
    g = torch.Generator().manual_seed(0)
    data = os.path.join(root, "shards")
    write_dataset_meta(data, {"latent_shape": SHAPE, "text_len": TEXT_LEN, "text_dim": text_dim,
                              "latent_dtype": "float32"})
    write_negative_context(data, torch.randn(TEXT_LEN, text_dim, generator=g), "blurry")
    with ShardWriter(os.path.join(data, shard_name(0)), latent_dtype=torch.float32) as w:
        for i in range(2):
            w.write(f"s{i:06d}", torch.randn(SHAPE, generator=g), torch.randn(4, text_dim, generator=g), f"p {i}")
    return data


def test_gpu_memory_check_plans_the_shard_shape(tmp_path, monkeypatch):
    """preflight's CUDA branch hands check_fits the shards' shape (the call site, with check_fits
    recorded; this machine has no GPU)."""
    data = _shards(str(tmp_path), preset("tiny").text_dim)
    train, model_cfg, rcm_cfg, par = parse_args(["--model", "tiny", "--device", "cpu", "--data", data,
                                                 "--micro-batch-size", "1", "--global-batch-size", "1"])
    assert train.latent_shape is None and train.memory_check
    seen = []
    monkeypatch.setattr(pf, "check_fits", lambda flags, cfg: seen.append(flags) or None)
    pf.preflight(dataclasses.replace(train, device="cuda"), model_cfg, rcm_cfg, par)
    assert len(seen) == 1
    assert tuple(seen[0].latent_shape) == SHAPE and seen[0].text_len == TEXT_LEN


def test_small_shards_fit_where_the_480p_plan_would_refuse(tmp_path):
    """Wan-1.3B on 60 GiB: the 480p default plan does not fit, the shards' small shape does."""
    data = _shards(str(tmp_path), 4096)
    train, _, rcm_cfg, par = parse_args(["--model", "wan-1.3b", "--device", "cpu", "--bf16", "--data", data,
                                         "--recompute-granularity", "full", "--recompute-num-layers", "1"])
    from rcm_megatron.data.shards import ShardDataset

    dataset = ShardDataset(data)
    cfg = preset("wan-1.3b")
    at_480p = check_fits(pf.plan_flags(train, rcm_cfg, par), cfg, world_size=1, gpu_memory_gib=60)
    at_shards = check_fits(pf.data_plan_flags(train, rcm_cfg, par, dataset), cfg, world_size=1, gpu_memory_gib=60)
    dataset.close()
    assert at_480p is not None and "memory plan" in at_480p
    assert at_shards is None
