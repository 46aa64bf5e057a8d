"""Activation recompute for the with-grad passes (Megatron-LM's ``--recompute-granularity``).

- ``full`` (``--recompute-num-layers N``): keep only the input of every group of N blocks and run
  the group's forward again in backward. Least memory; costs one more forward per with-grad pass.
- ``selective``: every block keeps the outputs of its matrix products (q/k/v/o, cross-attention
  and FFN GEMMs) and of attention, and recomputes the cheap elementwise work from them in backward:
  LayerNorms, adaLN modulation, the RMSNorm of q and k, RoPE, GELU, gated residuals and casts.
  These are memory-bound and cheap to redo, but their fp32 outputs are most of a block's
  activation memory. ``--recompute-modules core_attn`` also recomputes attention (Megatron-LM's
  name), keeping the GEMM outputs only.

Selective recompute is torch's selective activation checkpointing
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``) with an op policy: the policy is
ours, the mechanism is PyTorch's. The no-grad passes (teacher, tangent, rollouts) never recompute.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint as ckpt

GRANULARITIES = ("full", "selective")
RECOMPUTE_MODULES = ("elementwise", "core_attn")

_aten = torch.ops.aten
# Linears reach aten as (add)mm; batched products appear only in plain-math attention (QK^T, PV).
_GEMM_OPS = {_aten.mm.default, _aten.addmm.default}
_ATTENTION_OPS = {_aten.bmm.default, _aten.baddbmm.default} | {getattr(_aten, name).default for name in (
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_flash_attention_forward", "_efficient_attention_forward")
    if hasattr(_aten, name)}
if hasattr(_aten, "_scaled_mm"):
    _GEMM_OPS.add(_aten._scaled_mm.default)


@dataclass(frozen=True)
class RecomputeConfig:
    """granularity None (off), 'full' or 'selective'; num_layers: blocks per group for 'full';
    modules: for 'selective', 'elementwise' (always) and optionally 'core_attn'."""

    granularity: str | None = None
    num_layers: int = 1
    modules: tuple[str, ...] = ("elementwise",)

    def __post_init__(self):
        if self.granularity not in (None, *GRANULARITIES):
            raise ValueError(f"--recompute-granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not (isinstance(self.num_layers, int) and self.num_layers >= 1):
            raise ValueError(f"--recompute-num-layers must be an int >= 1, got {self.num_layers!r}")
        bad = [m for m in self.modules if m not in RECOMPUTE_MODULES]
        if bad:
            raise ValueError(f"--recompute-modules: unknown {bad}; expected some of {RECOMPUTE_MODULES}")
        object.__setattr__(self, "modules", tuple(dict.fromkeys(("elementwise", *self.modules))))

    @property
    def enabled(self) -> bool:
        return self.granularity is not None


def _policy(recompute_attention: bool, ctx, op, *args, **kwargs):
    if op in _GEMM_OPS or (op in _ATTENTION_OPS and not recompute_attention):
        return ckpt.CheckpointPolicy.MUST_SAVE
    return ckpt.CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint(fn, args, recompute_attention: bool):
    context = functools.partial(ckpt.create_selective_checkpoint_contexts,
                                functools.partial(_policy, recompute_attention))
    return ckpt.checkpoint(fn, *args, use_reentrant=False, context_fn=context)


def run_blocks_with_recompute(cfg: RecomputeConfig, blocks, call, *args):
    """Run ``call(group_of_blocks, *args) -> args[:2]`` over the blocks with grad enabled.

    ``call`` runs a list of consecutive blocks on (x, x_tan, *rest) and returns the new (x, x_tan);
    ``args`` = (x, x_tan, *rest). Returns the final (x, x_tan).
    """
    x, x_tan, rest = args[0], args[1], args[2:]
    if cfg.granularity == "full":
        step = cfg.num_layers
        for i in range(0, len(blocks), step):
            group = functools.partial(call, blocks[i:i + step])
            x, x_tan = ckpt.checkpoint(group, x, x_tan, *rest, use_reentrant=False)
        return x, x_tan
    attention = "core_attn" in cfg.modules
    for block in blocks:
        x, x_tan = _checkpoint(functools.partial(call, [block]), (x, x_tan, *rest), recompute_attention=attention)
    return x, x_tan
