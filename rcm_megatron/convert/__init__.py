"""Name and layout maps between our checkpoints and diffusers / original Wan formats.

- ``diffusers_wan``: diffusers ``WanTransformer3DModel`` <-> ours (``NAME_MAP`` / ``REVERSE_MAP`` compiled
  from one template table, ``load_diffusers_wan``), Wan2.2 A14B expert folders (``load_diffusers_wan_experts``)
- ``wan_original``: original Wan ``WanModel`` names <-> diffusers (``ORIGINAL_TO_DIFFUSERS`` / ``DIFFUSERS_TO_ORIGINAL``)
- ``delta``: base + scale * (student - teacher), streamed (``tools/merge_delta.py``)
- ``diffusers_scheduler``: the rCM sampler as a diffusers scheduler
- ``export``: any source -> a diffusers folder

Reading our checkpoints and the other formats is ``rcm_megatron.checkpointing``'s job.
"""

from .diffusers_wan import (config_from_diffusers, diffusers_config, diffusers_to_ours, load_diffusers_wan,
                            load_diffusers_wan_experts, ours_to_diffusers, save_diffusers_wan,
                            save_diffusers_wan_experts)

__all__ = ["config_from_diffusers", "diffusers_config", "diffusers_to_ours", "load_diffusers_wan",
           "load_diffusers_wan_experts", "ours_to_diffusers", "save_diffusers_wan", "save_diffusers_wan_experts"]
