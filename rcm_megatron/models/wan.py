"""The Wan DiT (Wan2.1 T2V / I2V, Wan2.2 TI2V and each A14B expert), with a tangent path.

``WanDiT(latents, timestep, context, image_context=None)`` computes what diffusers'
``WanTransformer3DModel`` computes (same parameter names after ``convert/``);
``forward_with_tangent`` is the no-grad pass that also returns the derivative along
(latents_tan, timestep_tan), used by the sCM loss.

Image-to-video conditioning, as diffusers' ``WanImageToVideoPipeline`` feeds it:
- Wan2.1 I2V / Wan2.2 I2V A14B: latents = [noisy 16 | mask 4 | condition 16] channels,
  concatenated by the caller; ``latents_tan`` may hold only the leading (noisy) channels, the
  condition channels then carry zero tangent. Wan2.1 I2V also takes ``image_context``, the
  CLIP image tokens [B, L_img, image_dim], which carry no tangent.
- Wan2.2 TI2V: ``timestep`` per token [B, S] (``timesteps.expand_timesteps``: 0 on the given
  first frame); ``timestep_tan`` has the same shape (and is 0 where the timestep is given).

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

from ..kernels.numerics import accumulate_dtype
from ..parallel import context_parallel as cp
from ..parallel import state as parallel_state
from ..parallel.tensor_parallel import (grad_sum_over_sequence_shards, linear_with_tangent, shard_sequence,
                                        unshard_sequence, validate_tp)
from .block import WanBlock
from .config import WanConfig
from .embeddings import ImageEmbedding, PatchEmbedding, TextEmbedding, TimeEmbedding
from .layers import LayerNorm, normalized
from .recompute import RecomputeConfig, run_blocks_with_recompute
from .rope import rope_cos_sin

# Modules kept in fp32 when the model runs in bf16 (as diffusers' _keep_in_fp32_modules).
FP32_MODULE_KEYWORDS = ("time_embedding", "scale_shift_table", "norm")


@dataclass
class StageState:
    """What flows between pipeline stages: tokens with tangent plus the per-sample conditioning."""

    x: torch.Tensor
    x_tan: torch.Tensor | None
    temb: torch.Tensor
    temb_tan: torch.Tensor | None
    tproj: torch.Tensor
    tproj_tan: torch.Tensor | None
    context: torch.Tensor
    grid: tuple[int, int, int]
    image_context: torch.Tensor | None = None  # embedded image tokens (Wan2.1 I2V)

    @property
    def seq_len(self) -> int:
        """Number of real tokens (x may hold a padded context- / sequence-parallel shard of them)."""
        f, h, w = self.grid
        return f * h * w


class _BlockGroup:
    """Consecutive blocks as one function of tensors (what activation checkpointing re-runs)."""

    def __init__(self, blocks, seq_len: int):
        self.blocks, self.seq_len = blocks, seq_len

    def __call__(self, x, x_tan, tproj, tproj_tan, context, rope, image_context=None):
        for block in self.blocks:
            x, x_tan = block(x, x_tan, tproj, tproj_tan, context, rope, self.seq_len, image_context)
        return x, x_tan


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
            if config.image_dim is not None:
                self.image_embedding = ImageEmbedding(config)
        # Every stage needs the time embedding (it conditions every block); it is tiny.
        self.time_embedding = TimeEmbedding(config)
        self.blocks = nn.ModuleDict({str(i): WanBlock(config) for i in range(first, last)})
        self.recompute = RecomputeConfig()  # activation recompute; see set_activation_recompute
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
    def check_inputs(self, latents, timestep, context, image_context=None, latents_tan=None, timestep_tan=None):
        c = self.config
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, C, T, H, W], got shape {tuple(latents.shape)}")
        b, ch, t, h, w = latents.shape
        if ch != c.in_channels:
            raise ValueError(f"latents have {ch} channels, expected in_channels={c.in_channels} (shape {tuple(latents.shape)})")
        for size, p, axis in zip((t, h, w), c.patch_size, ("T", "H", "W")):
            if size % p:
                raise ValueError(f"latent {axis}={size} is not divisible by the patch size {p} (shape {tuple(latents.shape)})")
        seq = (t // c.patch_size[0]) * (h // c.patch_size[1]) * (w // c.patch_size[2])
        if timestep.shape not in ((b,), (b, seq)):
            raise ValueError(f"timestep must have shape [{b}] or per token [{b}, {seq}], got {tuple(timestep.shape)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != c.text_dim:
            raise ValueError(f"text context must be [B={b}, L, text_dim={c.text_dim}], got {tuple(context.shape)}")
        if c.image_dim is None and image_context is not None:
            raise ValueError("image_context given to a model without image conditioning (image_dim is None)")
        if c.image_dim is not None and (image_context is None or image_context.dim() != 3
                                        or image_context.shape[0] != b or image_context.shape[2] != c.image_dim):
            got = None if image_context is None else tuple(image_context.shape)
            raise ValueError(f"image_context must be [B={b}, L_img, image_dim={c.image_dim}], got {got}")
        if latents_tan is not None and (latents_tan.shape[1] not in (ch, c.out_channels)
                                        or latents_tan.shape[2:] != latents.shape[2:] or latents_tan.shape[0] != b):
            raise ValueError(f"latents_tan must be [B, in_channels={ch} or out_channels={c.out_channels}, "
                             f"{t}, {h}, {w}], got {tuple(latents_tan.shape)}")
        if timestep_tan is not None and timestep_tan.shape != timestep.shape:
            raise ValueError(f"timestep_tan must have the timestep's shape {tuple(timestep.shape)}, "
                             f"got {tuple(timestep_tan.shape)}")

    # ----------------------------------------------------------------- stages
    def embed(self, latents, timestep, context, latents_tan=None, timestep_tan=None, image_context=None) -> StageState:
        c = self.config
        pt, ph, pw = c.patch_size
        grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        x, x_tan = shard_sequence(*cp.split_to_cp_chunk(*self.patch_embedding(latents, latents_tan)))
        ctx = self.text_embedding(context.to(self.text_embedding.linear_1.weight.dtype))
        img = None if image_context is None else self.image_embedding(image_context)
        state = StageState(x, x_tan, None, None, None, None, ctx, grid, img)
        return self.time_conditioning(state, timestep, timestep_tan)

    def time_conditioning(self, state: StageState, timestep, timestep_tan=None):
        """The time embedding of every stage (non-first pipeline stages recompute it, it is cheap).

        Per-token timesteps [B, S] are split over context / sequence parallelism like the tokens:
        the embedding is computed for this rank's context-parallel chunk only, then sharded.
        """
        per_token = timestep.dim() == 2
        if per_token:
            timestep, timestep_tan = cp.split_to_cp_chunk(timestep, timestep_tan)
        temb, temb_tan, tproj, tproj_tan = self.time_embedding(timestep, timestep_tan)
        if per_token:
            temb, temb_tan = shard_sequence(temb, temb_tan)
            tproj, tproj_tan = shard_sequence(tproj, tproj_tan)
        state.temb, state.temb_tan, state.tproj, state.tproj_tan = temb, temb_tan, tproj, tproj_tan
        return state

    def run_blocks(self, state: StageState) -> StageState:
        c = self.config
        if c.image_dim is not None and state.image_context is None:
            raise ValueError("an image-conditioned model's blocks need the embedded image tokens: StageState."
                             "image_context is None (pipeline stages must pass it on with the text)")
        rope = rope_cos_sin(state.grid, c.head_dim, c.rope_max_seq_len, c.rope_theta, device=state.x.device,
                            dtype=accumulate_dtype(state.x), token_range=cp.token_range(state.seq_len))
        blocks = list(self.blocks.values())
        if not (self.recompute.enabled and torch.is_grad_enabled()):
            for block in blocks:
                state.x, state.x_tan = block(state.x, state.x_tan, state.tproj, state.tproj_tan, state.context, rope,
                                             state.seq_len, state.image_context)
            return state
        state.x, state.x_tan = run_blocks_with_recompute(
            self.recompute, blocks, lambda group, *a: _BlockGroup(group, state.seq_len)(*a),
            state.x, state.x_tan, state.tproj, state.tproj_tan, state.context, rope, state.image_context)
        return state

    def quantize_fp8(self, num_layers_at_start_in_bf16: int = 0, num_layers_at_end_in_bf16: int = 0) -> int:
        """Freeze the blocks' linears into FP8 weights (a frozen teacher only, ``--fp8-teacher``): self- and
        cross-attention q/k/v/o (and I2V's image k/v), FFN fc1/fc2, each TP rank its own shard. They carry
        nearly all FLOPs and weight bytes. Time/text/image embeddings, patch embedding and head stay in
        full precision: per-sample or text-length work (well under 1% of the FLOPs), and the time embedding
        drives every block's adaLN modulation (kept in fp32 as diffusers keeps it). The first / last
        ``num_layers_at_start/end_in_bf16`` blocks of the whole network (``--first-last-layers-bf16``, as
        Megatron-LM's) stay in the teacher's own precision too (``kernels/fp8.py`` says why). Call after
        loading the full-precision weights; returns how many linears were quantized."""
        from ..kernels.fp8 import block_in_fp8, fp8_supported
        from ..parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        n = 0
        for key, block in self.blocks.items():
            if not block_in_fp8(int(key), self.config.num_layers, num_layers_at_start_in_bf16,
                                num_layers_at_end_in_bf16):
                continue
            for m in block.modules():
                if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and fp8_supported(*m.weight.shape[::-1]):
                    m.quantize_fp8()
                    n += 1
        return n

    def compile_blocks(self) -> None:
        """Regional ``torch.compile`` of every block: fuses the elementwise work around the GEMMs
        (norms, adaLN modulation, RoPE, GELU, gated residuals and their tangents) into few kernels.
        Identical blocks share the compiled code; the fused attention-with-tangent kernel runs
        as it is (a graph break). For single-GPU-per-model layouts (no TP/CP collectives inside
        blocks); the trainer decides when (``--compile-blocks``).

        One rCM iteration calls the blocks in up to ~12 variants (grad on/off, with/without tangent,
        bf16 teacher or fp32-master weights, a bf16 residual stream in the first block and fp32 after
        it): dynamo's default recompile limit of 8 sent the rest back to eager code, so it is raised."""
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for block in self.blocks.values():
            block.compile(dynamic=False)

    def set_activation_recompute(self, recompute: "RecomputeConfig | int") -> None:
        """Activation recompute of the with-grad passes (``models/recompute.py``). An int N is
        Megatron-LM's ``--recompute-granularity full --recompute-num-layers N`` (0: off). The no-grad
        passes (teacher, tangent, rollouts) are unaffected."""
        if isinstance(recompute, int):
            if recompute < 0:
                raise ValueError(f"recompute num_layers must be >= 0, got {recompute}")
            recompute = RecomputeConfig("full", recompute) if recompute else RecomputeConfig()
        self.recompute = recompute

    def head(self, state: StageState, out_shape):
        table = self.scale_shift_table.to(state.temb.dtype)
        if state.temb.dim() == 3:  # per-token times [B, S, D], sharded like the tokens
            shift, scale = (grad_sum_over_sequence_shards(table).unsqueeze(0) + state.temb.unsqueeze(2)).unbind(2)
            shift_tan = scale_tan = state.temb_tan
        else:
            mod = grad_sum_over_sequence_shards(table + state.temb.unsqueeze(1))
            shift, scale = mod.unsqueeze(2).unbind(1)
            shift_tan = scale_tan = None if state.temb_tan is None else state.temb_tan.unsqueeze(1)
        h, h_tan = normalized(self.norm_out, state.x, state.x_tan, shift, shift_tan, scale, scale_tan)
        y, y_tan = linear_with_tangent(h, h_tan, grad_sum_over_sequence_shards(self.proj_out.weight),
                                       grad_sum_over_sequence_shards(self.proj_out.bias))
        y, y_tan = unshard_sequence(y, y_tan, cp.chunk_length(state.seq_len))
        y, y_tan = cp.gather_cp_chunks(y, y_tan, state.seq_len)
        v = self._unpatchify(y, state.grid, out_shape)
        return v, None if y_tan is None else self._unpatchify(y_tan, state.grid, out_shape)

    def _unpatchify(self, y, grid, out_shape):
        pt, ph, pw = self.config.patch_size
        b = y.shape[0]
        f, h, w = grid
        y = y.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(b, -1, f * pt, h * ph, w * pw)

    # ----------------------------------------------------------------- single-stage API
    def _run(self, latents, timestep, context, latents_tan, timestep_tan, image_context):
        if not (self.pre_process and self.post_process):
            raise RuntimeError("forward() of a single pipeline stage: use embed/run_blocks/head")
        self.check_inputs(latents, timestep, context, image_context, latents_tan, timestep_tan)
        state = self.run_blocks(self.embed(latents, timestep, context, latents_tan, timestep_tan, image_context))
        return self.head(state, (latents.shape[0], self.config.out_channels, *latents.shape[2:]))

    def forward(self, latents, timestep, context, image_context=None):
        """Velocity prediction [B, out_channels, T, H, W]. timestep on diffusers' 0..1000 scale,
        [B] or per token [B, S]; image_context: CLIP image tokens (Wan2.1 I2V)."""
        return self._run(latents, timestep, context, None, None, image_context)[0]

    @torch.no_grad()
    def forward_with_tangent(self, latents, timestep, context, latents_tan, timestep_tan, image_context=None):
        """(v, dv) with dv the derivative of v along (latents_tan, timestep_tan); no autograd graph.
        The conditions (text, image tokens, condition channels beyond those of latents_tan) carry no tangent."""
        if timestep_tan is None:
            timestep_tan = torch.zeros_like(timestep)
        return self._run(latents, timestep, context, latents_tan, timestep_tan, image_context)


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
