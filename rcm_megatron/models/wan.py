"""The Wan2.1 text-to-video DiT, with a tangent path.

``WanDiT(latents, timestep, context)`` computes what diffusers' ``WanTransformer3DModel``
computes (same parameter names after ``convert/``); ``forward_with_tangent`` is the no-grad
pass that also returns the derivative along (t_latents, t_timestep), used by the sCM loss.

For pipeline parallelism a model holds a contiguous range of blocks; ``pre_process`` stages
own the embeddings, ``post_process`` stages own the head (megatron-core's GPTModel
convention). Parallel communication lives in ``parallel/``; this file only says what the
network computes.

Under context parallelism the flattened token sequence is split over the CP group after the
patch embedding (``StageState.x`` holds this rank's chunk of ceil(S/cp) tokens, zero-padded
at the end; RoPE takes the chunk's positions) and gathered after the head's projection.
Under sequence parallelism the chunk is sharded further over the tensor-parallel group
(ceil(chunk/tp) tokens per rank). The output is replicated on every rank; parameter
gradients are partial over CP (own tokens) and summed over DP x CP by the trainer (see
``parallel/context_parallel.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..parallel import context_parallel as cp
from ..parallel import state as parallel_state
from ..parallel.tensor_parallel import (grad_sum_over_sequence_shards, linear_with_tangent, shard_sequence,
                                        unshard_sequence, validate_tp)
from .block import WanBlock
from .config import WanConfig
from .embeddings import PatchEmbedding, TextEmbedding, TimeEmbedding
from .layers import LayerNorm, modulate
from .rope import rope_cos_sin

# Modules kept in fp32 when the model runs in bf16 (as diffusers' _keep_in_fp32_modules).
FP32_MODULE_KEYWORDS = ("time_embedding", "scale_shift_table", "norm")


@dataclass
class StageState:
    """What flows between pipeline stages: tokens with tangent plus the per-sample conditioning."""

    x: torch.Tensor
    tx: torch.Tensor | None
    temb: torch.Tensor
    ttemb: torch.Tensor | None
    tproj: torch.Tensor
    ttproj: torch.Tensor | None
    context: torch.Tensor
    grid: tuple[int, int, int]

    @property
    def seq_len(self) -> int:
        """Number of real tokens (x may hold a padded context- / sequence-parallel shard of them)."""
        f, h, w = self.grid
        return f * h * w


class _BlockGroup:
    """Consecutive blocks as one function of tensors (what activation checkpointing re-runs)."""

    def __init__(self, blocks, seq_len: int):
        self.blocks, self.seq_len = blocks, seq_len

    def __call__(self, x, tx, tproj, ttproj, context, rope):
        for block in self.blocks:
            x, tx = block(x, tx, tproj, ttproj, context, rope, self.seq_len)
        return x, tx


class WanDiT(nn.Module):
    def __init__(self, config: WanConfig, pre_process: bool = True, post_process: bool = True,
                 layer_range: tuple[int, int] | None = None):
        super().__init__()
        validate_tp(config, parallel_state.tensor_parallel_world_size())
        cp.validate_current_layout(config)
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        first, last = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= first <= last <= config.num_layers:
            raise ValueError(f"layer_range {layer_range} outside 0..{config.num_layers}")
        self.layer_range = (first, last)
        if pre_process:
            self.patch_embedding = PatchEmbedding(config)
            self.text_embedding = TextEmbedding(config)
        # Every stage needs the time embedding (it conditions every block); it is tiny.
        self.time_embedding = TimeEmbedding(config)
        self.blocks = nn.ModuleDict({str(i): WanBlock(config) for i in range(first, last)})
        self.recompute_num_layers = 0  # activation checkpointing; see set_activation_recompute
        if post_process:
            d = config.hidden_size
            self.norm_out = LayerNorm(d, config.eps, affine=False)
            self.proj_out = nn.Linear(d, config.out_channels * config.patch_volume)
            self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        self.reset_parameters(seed=0)

    # ----------------------------------------------------------------- parameters
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0):
        """Deterministic, layout-independent init.

        Each parameter is drawn at its *full* (unsharded) shape from a generator keyed by
        the seed and the parameter's global name, then sliced to this rank's shard, so the
        same seed gives the same model under any TP/PP layout.
        """
        tp, rank = parallel_state.tensor_parallel_world_size(), parallel_state.tensor_parallel_rank()
        for name, p in self.named_parameters():
            split = getattr(p, "tp_split_dim", None)
            full = list(p.shape)
            if split is not None:
                full[split] *= tp
            g = torch.Generator().manual_seed(_stable_seed(seed, name))
            full_t = _init_tensor(name, full, g)
            if split is not None:
                full_t = full_t.chunk(tp, dim=split)[rank]
            p.copy_(full_t.to(p.dtype))

    def to_dtype(self, dtype: torch.dtype) -> "WanDiT":
        """Cast to ``dtype`` but keep time embedding, modulation tables and norms in fp32."""
        for name, p in self.named_parameters():
            keep = dtype in (torch.bfloat16, torch.float16) and any(k in name for k in FP32_MODULE_KEYWORDS)
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

    # ----------------------------------------------------------------- validation
    def check_inputs(self, latents, timestep, context):
        c = self.config
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, C, T, H, W], got shape {tuple(latents.shape)}")
        b, ch, t, h, w = latents.shape
        if ch != c.in_channels:
            raise ValueError(f"latents have {ch} channels, expected in_channels={c.in_channels} (shape {tuple(latents.shape)})")
        for size, p, axis in zip((t, h, w), c.patch_size, ("T", "H", "W")):
            if size % p:
                raise ValueError(f"latent {axis}={size} is not divisible by the patch size {p} (shape {tuple(latents.shape)})")
        if timestep.shape != (b,):
            raise ValueError(f"timestep must have shape [{b}], got {tuple(timestep.shape)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != c.text_dim:
            raise ValueError(f"text context must be [B={b}, L, text_dim={c.text_dim}], got {tuple(context.shape)}")

    # ----------------------------------------------------------------- stages
    def embed(self, latents, timestep, context, t_latents=None, t_timestep=None) -> StageState:
        c = self.config
        pt, ph, pw = c.patch_size
        grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        x, tx = shard_sequence(*cp.split_to_cp_chunk(*self.patch_embedding(latents, t_latents)))
        temb, ttemb, tproj, ttproj = self.time_embedding(timestep, t_timestep)
        ctx = self.text_embedding(context.to(self.text_embedding.linear_1.weight.dtype))
        return StageState(x, tx, temb, ttemb, tproj, ttproj, ctx, grid)

    def time_conditioning(self, state: StageState, timestep, t_timestep=None):
        """Non-first pipeline stages recompute the (cheap) time embedding locally."""
        state.temb, state.ttemb, state.tproj, state.ttproj = self.time_embedding(timestep, t_timestep)
        return state

    def run_blocks(self, state: StageState) -> StageState:
        c = self.config
        rope = rope_cos_sin(state.grid, c.head_dim, c.rope_max_seq_len, c.rope_theta, device=state.x.device,
                            dtype=torch.float64 if state.x.dtype == torch.float64 else torch.float32,
                            token_range=cp.token_range(state.seq_len))
        blocks = list(self.blocks.values())
        group = self.recompute_num_layers if torch.is_grad_enabled() else 0
        if group <= 0:
            for block in blocks:
                state.x, state.tx = block(state.x, state.tx, state.tproj, state.ttproj, state.context, rope,
                                          state.seq_len)
            return state
        for i in range(0, len(blocks), group):  # keep only each group's input; recompute it in backward
            run = _BlockGroup(blocks[i:i + group], state.seq_len)
            state.x, state.tx = torch.utils.checkpoint.checkpoint(
                run, state.x, state.tx, state.tproj, state.ttproj, state.context, rope, use_reentrant=False)
        return state

    def set_activation_recompute(self, num_layers: int) -> None:
        """Megatron-LM's ``--recompute-granularity full --recompute-method uniform``: with grad on,
        keep only the input of every group of ``num_layers`` blocks and recompute the group in
        backward (0: off). The no-grad passes (teacher, tangent, rollouts) are unaffected."""
        if num_layers < 0:
            raise ValueError(f"recompute num_layers must be >= 0, got {num_layers}")
        self.recompute_num_layers = int(num_layers)

    def head(self, state: StageState, out_shape):
        c = self.config
        mod = grad_sum_over_sequence_shards(self.scale_shift_table.to(state.temb.dtype) + state.temb.unsqueeze(1))
        shift, scale = mod.unsqueeze(2).unbind(1)
        t_shift = t_scale = None
        if state.ttemb is not None:
            t_shift = t_scale = state.ttemb.unsqueeze(1)
        n, tn = self.norm_out(state.x, state.tx)
        h, th = modulate(n, tn, shift, t_shift, scale, t_scale)
        h = h.to(state.x.dtype)
        th = None if th is None else th.to(state.x.dtype)
        y, ty = linear_with_tangent(h, th, grad_sum_over_sequence_shards(self.proj_out.weight),
                                    grad_sum_over_sequence_shards(self.proj_out.bias))
        y, ty = unshard_sequence(y, ty, cp.chunk_length(state.seq_len))
        y, ty = cp.gather_cp_chunks(y, ty, state.seq_len)
        return self._unpatchify(y, state.grid, out_shape), None if ty is None else self._unpatchify(ty, state.grid, out_shape)

    def _unpatchify(self, y, grid, out_shape):
        pt, ph, pw = self.config.patch_size
        b = y.shape[0]
        f, h, w = grid
        y = y.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(b, -1, f * pt, h * ph, w * pw)

    # ----------------------------------------------------------------- single-stage API
    def _run(self, latents, timestep, context, t_latents, t_timestep):
        if not (self.pre_process and self.post_process):
            raise RuntimeError("forward() of a single pipeline stage: use embed/run_blocks/head")
        self.check_inputs(latents, timestep, context)
        state = self.run_blocks(self.embed(latents, timestep, context, t_latents, t_timestep))
        return self.head(state, latents.shape)

    def forward(self, latents, timestep, context):
        """Velocity prediction, same shape as latents. timestep on diffusers' 0..1000 scale."""
        return self._run(latents, timestep, context, None, None)[0]

    @torch.no_grad()
    def forward_with_tangent(self, latents, timestep, context, t_latents, t_timestep):
        """(v, dv) with dv the derivative of v along (t_latents, t_timestep); no autograd graph."""
        if t_timestep is None:
            t_timestep = torch.zeros_like(timestep)
        return self._run(latents, timestep, context, t_latents, t_timestep)


def _stable_seed(seed: int, name: str) -> int:
    h = 1469598103934665603
    for ch in f"{seed}:{name}".encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return h % (1 << 63)


def _init_tensor(name: str, shape, g: torch.Generator) -> torch.Tensor:
    if name.endswith("scale_shift_table"):
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    if name.endswith("bias"):
        return torch.zeros(shape)
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape)
    if len(shape) >= 2:  # xavier uniform on the full matrix (conv: fan over the patch volume)
        rf = math.prod(shape[2:]) if len(shape) > 2 else 1
        fan_in, fan_out = shape[1] * rf, shape[0] * rf
        a = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=g) * 2 - 1) * a
    return torch.zeros(shape)
