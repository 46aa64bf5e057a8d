"""The Wan2.1 DiT built from tangent-aware layers."""

from .config import PRESETS, WanConfig, preset
from .wan import WanDiT

__all__ = ["PRESETS", "WanConfig", "WanDiT", "preset"]
