"""One Wan2.1 transformer block: modulated self-attention, cross-attention, modulated FFN.

Reads as diffusers' WanTransformerBlock, with a tangent beside every activation.
Modulation and residual arithmetic run in fp32 (at least), as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..parallel.context_parallel import chunk_length
from ..parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, grad_sum_over_sequence_shards,
                                        tensor_parallel_input)
from .attention import CrossAttention, SelfAttention
from .config import WanConfig
from .layers import LayerNorm, gated_residual, gelu_tanh, normalized


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.fc1 = ColumnParallelLinear(hidden_size, ffn_hidden_size)
        self.fc2 = RowParallelLinear(ffn_hidden_size, hidden_size)

    def forward(self, x, x_tan=None, seq_len: int | None = None):
        x, x_tan = tensor_parallel_input(x, x_tan, chunk_length(seq_len))
        return self.fc2(*gelu_tanh(*self.fc1(x, x_tan)))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = LayerNorm(d, cfg.eps, affine=False)
        self.attn1 = SelfAttention(d, cfg.num_attention_heads, cfg.eps)
        self.norm2 = LayerNorm(d, cfg.eps, affine=cfg.cross_attn_norm)
        self.attn2 = CrossAttention(d, cfg.num_attention_heads, cfg.eps, image_kv=cfg.image_dim is not None)
        self.norm3 = LayerNorm(d, cfg.eps, affine=False)
        self.ffn = FeedForward(d, cfg.ffn_hidden_size)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x, x_tan, tproj, tproj_tan, context, rope, seq_len: int | None = None, image_context=None):
        """x [B,S,D]; tproj (time projection, fp32) [B,6,D], or per token [B,S,6,D] (sharded
        like x), and its tangent; context [B,L,D]; image_context [B,L_img,D] or None.

        Under context / sequence parallelism x is this rank's chunk / shard of the tokens and
        seq_len the real length of the whole sequence.
        """
        table = self.scale_shift_table.to(tproj.dtype)
        if tproj.dim() == 4:  # per-token times: the tokens' own modulation, [B,S,D] each
            mod = (grad_sum_over_sequence_shards(table).unsqueeze(0) + tproj).unbind(2)
            mod_tan = (None,) * 6 if tproj_tan is None else tproj_tan.unbind(2)
        else:
            mod = grad_sum_over_sequence_shards(table + tproj).unsqueeze(2).unbind(1)
            mod_tan = (None,) * 6 if tproj_tan is None else tproj_tan.unsqueeze(2).unbind(1)
        shift, scale, gate, c_shift, c_scale, c_gate = mod
        shift_tan, scale_tan, gate_tan, c_shift_tan, c_scale_tan, c_gate_tan = mod_tan

        h, h_tan = normalized(self.norm1, x, x_tan, shift, shift_tan, scale, scale_tan)
        a, a_tan = self.attn1(h, h_tan, rope, seq_len)
        x, x_tan = gated_residual(x, x_tan, a, a_tan, gate, gate_tan)

        h, h_tan = normalized(self.norm2, x, x_tan)
        a, a_tan = self.attn2(h, h_tan, context, seq_len, image_context)
        x = x + a
        x_tan = None if x_tan is None else x_tan + a_tan

        h, h_tan = normalized(self.norm3, x, x_tan, c_shift, c_shift_tan, c_scale, c_scale_tan)
        f, f_tan = self.ffn(h, h_tan, seq_len)
        return gated_residual(x, x_tan, f, f_tan, c_gate, c_gate_tan)
