"""Name and layout maps between our checkpoints and diffusers / original Wan formats."""

from .diffusers_wan import config_from_diffusers, diffusers_to_ours, load_diffusers_wan, ours_to_diffusers

__all__ = ["config_from_diffusers", "diffusers_to_ours", "load_diffusers_wan", "ours_to_diffusers"]
