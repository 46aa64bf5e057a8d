"""A first estimate of the host memory a CPU run needs, checked before any model is allocated, so
``--model wan-14b`` on a CPU machine ends with one line instead of a swap storm or the OOM
killer. Deliberately simple (a full memory planner replaces ``training_bytes``): model copies
and optimizer state, no activations.
"""

from __future__ import annotations

import os

import torch

from ..models import WanConfig, WanDiT

FP32 = 4


def parameter_count(cfg: WanConfig) -> int:
    """Exact, from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in WanDiT(cfg).parameters())


def training_bytes(cfg: WanConfig, *, distill: bool, uses_fake_score: bool, bf16: bool, model_shards: int = 1) -> int:
    """Bytes of the models and optimizer state one rank holds: the frozen teacher, the trained
    models (student, fake score) with their gradients, the student's power EMA (fp32) and AdamW's
    two moments (fp32) per trained parameter; ``model_shards`` = TP x PP ranks share a model."""
    n = parameter_count(cfg) // model_shards
    weight = 2 if bf16 else FP32
    trained = 1 + (1 if distill and uses_fake_score else 0)
    frozen = 1 if distill else 0
    return n * (weight * (frozen + 2 * trained) + FP32 * (1 + 2 * trained))


def check_host_memory(cfg: WanConfig, what: str, *, distill: bool, uses_fake_score: bool, bf16: bool,
                      model_shards: int = 1) -> None:
    """Raise ValueError (one line naming ``what``) when the estimate for the ranks on this host
    (torchrun's LOCAL_WORLD_SIZE) exceeds the available host RAM."""
    import psutil

    ranks_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = ranks_on_host * training_bytes(cfg, distill=distill, uses_fake_score=uses_fake_score, bf16=bf16,
                                          model_shards=model_shards)
    have = psutil.virtual_memory().available
    if need > have:
        models = "teacher, student, fake score" if distill and uses_fake_score else \
            ("teacher, student" if distill else "the model")
        raise ValueError(f"{what}: a CPU run needs about {need / 2**30:.0f} GiB of host memory ({models}, gradients, "
                         f"EMA and AdamW state of {parameter_count(cfg) / 1e9:.2f}B parameters), "
                         f"{have / 2**30:.0f} GiB are available; train it on GPUs (--device cuda, model parallel "
                         "under torchrun) or pick a smaller --model")
