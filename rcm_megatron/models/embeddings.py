"""Input embeddings of Wan: 3D patch embedding, time embedding, text and image embeddings.

The time embedding runs in fp32 (at least) and carries the tangent with respect to the
timestep, which the sCM tangent pass needs; it takes one timestep per sample [B] or one per
token [B, S] (Wan2.2 TI2V). Text and image tokens are conditions: they carry no tangent. All of
these are replicated under tensor parallelism (their gradients are reduced by the parallel
layer, see parallel/).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import WanConfig
from ..kernels.numerics import accumulate_dtype
from .layers import silu


def sinusoidal_embedding(t, t_tan, dim: int, max_period: float = 10000.0):
    """[cos(t f), sin(t f)] (diffusers' flip_sin_to_cos=True, shift 0) and its tangent in t."""
    half = dim // 2
    dtype = accumulate_dtype(t)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    freqs = freqs.to(dtype)
    arg = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    if t_tan is None:
        return emb, None
    arg_tan = t_tan.to(dtype)[:, None] * freqs[None]
    return emb, torch.cat([-torch.sin(arg) * arg_tan, torch.cos(arg) * arg_tan], dim=-1)


def _linear(x, x_tan, layer: nn.Linear):
    y = F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
    return y, None if x_tan is None else F.linear(x_tan, layer.weight.to(x_tan.dtype))


class TimeEmbedding(nn.Module):
    """sinusoid(256) -> Linear -> SiLU -> Linear = temb; SiLU -> Linear(6 D) = time projection."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.hidden_size
        self.freq_dim = cfg.freq_dim
        self.linear_1 = nn.Linear(cfg.freq_dim, d)
        self.linear_2 = nn.Linear(d, d)
        self.time_proj = nn.Linear(d, 6 * d)

    def forward(self, timestep, timestep_tan=None):
        """timestep [B] or [B, S] -> (temb [..., D], temb_tan, tproj [..., 6, D], tproj_tan), in fp32 or fp64."""
        lead = timestep.shape
        e, e_tan = sinusoidal_embedding(timestep.flatten(), None if timestep_tan is None else timestep_tan.flatten(),
                                        self.freq_dim)
        if self.linear_1.weight.dtype == torch.float64:
            e, e_tan = e.double(), None if e_tan is None else e_tan.double()
        h, h_tan = silu(*_linear(e, e_tan, self.linear_1))
        temb, temb_tan = _linear(h, h_tan, self.linear_2)
        p, p_tan = _linear(*silu(temb, temb_tan), self.time_proj)

        def shaped(y, *tail):
            return None if y is None else y.reshape(*lead, *tail, -1)
        return shaped(temb), shaped(temb_tan), shaped(p, 6), shaped(p_tan, 6)


class TextEmbedding(nn.Module):
    """Linear -> GELU(tanh) -> Linear from the text encoder's width to the model width."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.text_dim, cfg.hidden_size)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, context):
        return self.linear_2(F.gelu(self.linear_1(context), approximate="tanh"))


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: LayerNorm -> Linear -> GELU -> Linear -> LayerNorm
    (diffusers' WanImageEmbedding, the original Wan's ``img_emb``; norms in fp32, eps 1e-5).

    Plain (not sequence-sharded) norms: the image tokens are replicated on every rank.
    """

    eps = 1e-5

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.image_dim, eps=self.eps)
        self.fc1 = nn.Linear(cfg.image_dim, cfg.image_dim)
        self.fc2 = nn.Linear(cfg.image_dim, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=self.eps)

    @staticmethod
    def _norm(x, norm: nn.LayerNorm):
        dt = accumulate_dtype(x)
        return F.layer_norm(x.to(dt), norm.normalized_shape, norm.weight.to(dt), norm.bias.to(dt), norm.eps).to(x.dtype)

    def forward(self, image):
        h = self._norm(image.to(self.fc1.weight.dtype), self.norm1)
        h = self.fc2(F.gelu(self.fc1(h)))
        return self._norm(h, self.norm2)


class PatchEmbedding(nn.Module):
    """Conv3d with kernel = stride = patch size, i.e. a linear map of each patch."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x, x_tan=None):
        """[B,C,T,H,W] -> tokens [B, S, D] in (t, h, w) order.

        The tangent may cover only the leading channels of x (an image-to-video model's noisy
        latents; the condition channels after them are fixed and carry zero tangent)."""
        y = self.proj(x).flatten(2).transpose(1, 2)
        if x_tan is None:
            return y, None
        weight = self.proj.weight[:, :x_tan.shape[1]]
        y_tan = F.conv3d(x_tan.to(x.dtype), weight, None, stride=self.proj.stride)
        return y, y_tan.flatten(2).transpose(1, 2)
