"""The Wan DiT family built from tangent-aware layers: Wan2.1 T2V / I2V, Wan2.2 TI2V and A14B experts."""

from rcm_megatron import lazy_exports

# name -> submodule, imported on first use (see rcm_megatron.lazy_exports)
_EXPORTS = {
    "PRESETS": ".config",
    "WanConfig": ".config",
    "preset": ".config",
    "WanExperts": ".experts",
    "expand_timesteps": ".timesteps",
    "WanDiT": ".wan",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["PRESETS", "WanConfig", "WanDiT", "WanExperts", "expand_timesteps", "preset"]
