"""Build a WanDiT from what the stack writes: a model file (``save_model_file``, e.g. the shipped
toy teacher or an exported one), or a training checkpoint directory (``--save``), taking
the power-EMA shadow (default), the raw student, or the fake score.

Two checkpoint layouts are read: ``iter_NNNNNNN/train_state.pt`` (one torch file with
"student", "ema" {"shadow"}, "fake_score", "model_config") and megatron-core
``dist_checkpointing`` folders (``metadata.json`` + ``common.pt``; tensors keyed
"student.<param>", "ema.<param>", "fake_score.<param>", configs under common "meta"),
loaded unsharded on one process.
"""

from __future__ import annotations

import os

import torch

from ..convert.sources import read_model_source
from ..models import WanConfig, WanDiT

WEIGHTS = ("ema", "student", "fake_score")
MARKER = "latest_checkpointed_iteration.txt"


def _iteration_dir(root: str, iteration: int | None) -> str:
    if iteration is None:
        marker = os.path.join(root, MARKER)
        if not os.path.isfile(marker):
            raise FileNotFoundError(f"{root}: no {MARKER}; no complete checkpoint was committed there")
        text = open(marker).read().strip()
        if not text.isdigit():
            raise ValueError(f"{marker}: expected an iteration number, found {text!r}")
        iteration = int(text)
    path = os.path.join(root, f"iter_{iteration:07d}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{root}: checkpoint folder {path} is missing")
    return path


def checkpoint_weights(ckpt: dict, which: str = "ema") -> dict:
    """Full state dict of one model of a ``train_state.pt`` checkpoint (``which`` in WEIGHTS)."""
    if which not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {which!r}")
    if which == "ema":
        return {k: v.float() for k, v in ckpt["ema"]["shadow"].items()}
    sd = ckpt.get(which)
    if sd is None:
        raise ValueError(f"checkpoint has no {which!r} weights (a --method without a fake score?)")
    return sd


def _read_torch_state(path: str, which: str) -> tuple[WanConfig, dict, dict]:
    ckpt = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)
    meta = {"iteration": int(ckpt["iteration"]), "mode": ckpt.get("mode"), "method": ckpt.get("method"),
            "rcm_config": ckpt.get("rcm_config"), "teacher": ckpt.get("teacher")}
    return WanConfig.from_dict(ckpt["model_config"]), checkpoint_weights(ckpt, which), meta


def _read_dist_state(path: str, which: str) -> tuple[WanConfig, dict, dict]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    if which not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {which!r}")
    common = dist_checkpointing.load_common_state_dict(path)
    info = common.get("meta", common)
    cfg = WanConfig.from_dict(info["model_config"])
    if which == "fake_score" and info.get("method") not in ("rcm", "dmd"):
        raise ValueError(f"checkpoint has no 'fake_score' weights (--method {info.get('method')})")
    template = {which: {n: ShardedTensor.from_rank_offsets(f"{which}.{n}", torch.empty_like(p.detach(), dtype=torch.float32),
                                                           replica_id=0)
                        for n, p in WanDiT(cfg).named_parameters()}}
    import torch.distributed as dist

    own_group = dist.is_available() and not dist.is_initialized()
    if own_group:  # dist_checkpointing needs a process group: a world of one, gone afterwards
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        loaded = dist_checkpointing.load(template, path)[which]
    finally:
        if own_group:
            dist.destroy_process_group()
    meta = {k: info.get(k) for k in ("iteration", "mode", "method", "rcm_config", "teacher")}
    return cfg, {k: v.float() for k, v in loaded.items()}, meta


def read_weights(path: str, which: str = "ema", iteration: int | None = None) -> tuple[WanConfig, dict, dict]:
    """(config, state dict, meta) from a model file or a checkpoint dir (latest iteration by default)."""
    if os.path.isdir(path) and (os.path.isfile(os.path.join(path, MARKER)) or iteration is not None):
        it_dir = _iteration_dir(path, iteration)
        if os.path.isfile(os.path.join(it_dir, "train_state.pt")):
            cfg, sd, meta = _read_torch_state(it_dir, which)
        elif os.path.isfile(os.path.join(it_dir, "metadata.json")):
            cfg, sd, meta = _read_dist_state(it_dir, which)
        else:
            raise FileNotFoundError(f"{it_dir}: neither train_state.pt nor a dist_checkpointing metadata.json")
        return cfg, sd, {"source": os.path.abspath(path), "weights": which, **meta}
    return read_model_source(path)


def load_model(path: str, which: str = "ema", iteration: int | None = None, device="cpu") -> tuple[WanDiT, dict]:
    """(eval-mode WanDiT in float32 without grad, meta)."""
    cfg, sd, meta = read_weights(path, which, iteration)
    model = WanDiT(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: weights do not match the {cfg} architecture "
                       f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    model.requires_grad_(False)
    return model.to(device).eval(), meta


def random_init_like(model: WanDiT, seed: int = 0) -> WanDiT:
    m = WanDiT(model.config)
    m.reset_parameters(seed=seed)
    return m.requires_grad_(False).eval()
