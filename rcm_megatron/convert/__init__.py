"""Name and layout maps between our checkpoints and diffusers / original Wan formats.

- ``diffusers_wan``: diffusers ``WanTransformer3DModel`` <-> ours (``NAME_MAP``, ``load_diffusers_wan``)
- ``wan_original``: original Wan2.1 ``WanModel`` names -> diffusers (``ORIGINAL_TO_DIFFUSERS``)
- ``diffusers_scheduler``: the rCM sampler as a diffusers scheduler

Reading and writing these formats (and our checkpoints) is ``rcm_megatron.checkpointing``'s job.
"""

from .diffusers_wan import config_from_diffusers, diffusers_config, diffusers_to_ours, load_diffusers_wan, ours_to_diffusers

__all__ = ["config_from_diffusers", "diffusers_config", "diffusers_to_ours", "load_diffusers_wan", "ours_to_diffusers"]
