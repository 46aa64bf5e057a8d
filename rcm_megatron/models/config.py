"""Architecture of the Wan DiT family (Wan2.1 T2V / I2V, Wan2.2), one validated dataclass.

Field names follow diffusers' ``WanTransformer3DModel`` config where one exists, so a
diffusers ``config.json`` maps onto this class by name (see ``convert/``). Image-to-video
models differ only in ``in_channels`` (noisy latents + condition latents + mask, concatenated
by the caller) and, for Wan2.1 I2V, ``image_dim`` (CLIP image tokens through added K/V
projections of cross-attention). Wan2.2's two-expert A14B is two of these (``experts.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class WanConfig:
    num_layers: int
    hidden_size: int  # = heads * head_dim (diffusers' inner_dim)
    ffn_hidden_size: int
    num_attention_heads: int
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    cross_attn_norm: bool = True
    # Width of the CLIP image tokens (Wan2.1 I2V: 1280); None for text-only cross-attention.
    # The embedded image tokens are hidden_size wide (diffusers' added_kv_proj_dim = hidden_size).
    image_dim: int | None = None

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "in_channels", "out_channels", "text_dim", "freq_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.image_dim is not None and int(self.image_dim) <= 0:
            raise ValueError(f"WanConfig.image_dim must be a positive integer or None, got {self.image_dim}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"WanConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"WanConfig head_dim ({self.head_dim}) must be even for RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        if len(self.patch_size) != 3 or any(int(p) <= 0 for p in self.patch_size):
            raise ValueError(f"WanConfig.patch_size must be three positive ints, got {self.patch_size}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WanConfig fields {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


PRESETS: dict[str, WanConfig] = {
    # CPU-friendly: 2 blocks, head dim 32, small text dim; same structure as the real models.
    "tiny": WanConfig(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                      in_channels=16, out_channels=16, text_dim=64),
    # The tiny model with 4 blocks: pipeline-parallel tests split it into 2 or 4 stages.
    "tiny-4l": WanConfig(num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                         in_channels=16, out_channels=16, text_dim=64),
    # The built-in toy video task (--data toy, rcm_megatron/data/toy.py): 4-channel 4x8x8 latents,
    # 32-wide class embeddings; 4 blocks of width 128, ~1M parameters (assets/toy_teacher.pt).
    "toy": WanConfig(num_layers=4, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4,
                     in_channels=4, out_channels=4, text_dim=32, freq_dim=64),
    "wan-1.3b": WanConfig(num_layers=30, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                          text_dim=4096),
    "wan-14b": WanConfig(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40,
                         text_dim=4096),
    # Wan2.1 I2V 14B: 480P and 720P releases share the architecture (they differ in training resolution).
    "wan-i2v-14b-480p": WanConfig(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40,
                                  in_channels=36, out_channels=16, text_dim=4096, image_dim=1280),
    "wan-i2v-14b-720p": WanConfig(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40,
                                  in_channels=36, out_channels=16, text_dim=4096, image_dim=1280),
    # One expert of Wan2.2 I2V A14B (high- and low-noise experts share it; see experts.py): no CLIP branch.
    "wan2.2-i2v-a14b": WanConfig(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40,
                                 in_channels=36, out_channels=16, text_dim=4096),
    # Wan2.2 TI2V-5B: 48-channel latents of the Wan2.2 VAE; image-to-video through per-token timesteps.
    "wan2.2-ti2v-5b": WanConfig(num_layers=30, hidden_size=3072, ffn_hidden_size=14336, num_attention_heads=24,
                                in_channels=48, out_channels=48, text_dim=4096),
}


def preset(name: str) -> WanConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
