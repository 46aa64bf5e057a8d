"""AdamW for the student and the fake score (docs/design.md §2.6): betas (0, 0.999),
weight decay 0.01, no gradient clipping unless ``grad_clip_norm`` is set.

``adamw_kwargs`` is the single source of the settings so a megatron-core distributed
optimizer config can be filled from it on GPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import RCMConfig

_LR_FIELD = {"student": "lr_student", "fake_score": "lr_fake_score"}


def adamw_kwargs(cfg: RCMConfig, which: str) -> dict:
    """lr, betas, eps, weight_decay for which = 'student' | 'fake_score'."""
    if which not in _LR_FIELD:
        raise ValueError(f"which: expected one of {sorted(_LR_FIELD)}, got {which!r}")
    return dict(lr=getattr(cfg, _LR_FIELD[which]), betas=cfg.adam_betas, eps=cfg.adam_eps,
                weight_decay=cfg.weight_decay)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: RCMConfig, which: str) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in params if p.requires_grad], **adamw_kwargs(cfg, which))


def clip_gradients(params: Iterable[torch.nn.Parameter], cfg: RCMConfig) -> torch.Tensor | None:
    """Clip to cfg.grad_clip_norm and return the pre-clip norm; no-op (None) by default."""
    if cfg.grad_clip_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip_norm)
