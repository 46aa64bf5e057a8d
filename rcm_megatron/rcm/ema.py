"""Power EMA of the student (Karras et al. 2024; docs/design.md §2.6).

For relative width s, gamma is the largest real root of
  g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0
(equivalently s^2 = (g+1)/((g+2)^2 (g+3))), and update n (0-based, counting student steps)
uses beta_n = (1 - 1/(n+1))^(gamma+1): the first update copies the student, later ones
average over a window growing with training length. Updated on student steps only.
Parameters only (no buffers); the shadow is kept in >= fp32 and works on whatever local
shard each rank holds.

Sharded over data parallelism: the shadow is an fp32 copy of the model (as large as the
AdamW moments), so each DP x CP rank keeps and updates only its share of the parameters
(``names``, from ``partition_names``: whole tensors, balanced by size). Whole tensors rather
than flat slices keep every shadow tensor shaped like its parameter, so checkpoints hold
ordinary per-parameter tensors that load at any DP size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def power_ema_gamma(sigma_rel: float) -> float:
    if not 0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel: expected a number in (0, 0.2887) (gamma > 0), got {sigma_rel!r}")
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_beta(n: int, gamma: float) -> float:
    return (1.0 - 1.0 / (n + 1)) ** (gamma + 1)


def partition_names(sizes: dict[str, int], num_parts: int) -> list[list[str]]:
    """Split named tensors into ``num_parts`` groups of near-equal total size (largest first onto
    the lightest group; ties by name), deterministic given ``sizes``."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    parts: list[list[str]] = [[] for _ in range(num_parts)]
    load = [0] * num_parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        k = min(range(num_parts), key=lambda i: (load[i], i))
        parts[k].append(name)
        load[k] += sizes[name]
    return parts


class PowerEMA:
    """Shadow copy of a model's parameters under the power-EMA schedule."""

    def __init__(self, model: nn.Module, sigma_rel: float = 0.1, names=None):
        """``names``: the parameters this rank keeps (default all)."""
        self.sigma_rel = float(sigma_rel)
        self.gamma = power_ema_gamma(self.sigma_rel)
        self.num_updates = 0
        keep = None if names is None else set(names)
        self.shadow = {
            name: p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone()
            for name, p in model.named_parameters() if keep is None or name in keep
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the current parameters in; returns the beta used."""
        beta = power_ema_beta(self.num_updates, self.gamma)
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1.0 - beta)
        self.num_updates += 1
        return beta

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Copy the shadow into ``model`` (the parameters this rank keeps)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"sigma_rel": self.sigma_rel, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            missing = set(self.shadow) ^ set(state["shadow"])
            raise KeyError(f"PowerEMA.load_state_dict: parameter names differ: {sorted(missing)[:5]}")
        self.sigma_rel = float(state["sigma_rel"])
        self.gamma = power_ema_gamma(self.sigma_rel)
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
