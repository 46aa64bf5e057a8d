"""The Wan DiT family built from tangent-aware layers: Wan2.1 T2V / I2V, Wan2.2 TI2V and A14B experts."""

from .config import PRESETS, WanConfig, preset
from .experts import WanExperts
from .timesteps import expand_timesteps
from .wan import WanDiT

__all__ = ["PRESETS", "WanConfig", "WanDiT", "WanExperts", "expand_timesteps", "preset"]
