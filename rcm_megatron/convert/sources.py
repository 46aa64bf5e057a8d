"""Where a model's weights come from: a diffusers folder or one of our model files.

``read_model_source(path)`` returns (WanConfig, full state dict in our names) and checks
the file before anything is built, so a wrong path or file fails fast with its name.
"""

from __future__ import annotations

import os

import torch

from ..models.config import WanConfig


def read_model_source(path: str) -> tuple[WanConfig, dict, dict]:
    """(config, state_dict, provenance) of a teacher/student source."""
    if os.path.isdir(path):
        from .diffusers_wan import _read_folder, config_from_diffusers, diffusers_to_ours

        cfg_dict, sd = _read_folder(path)
        return config_from_diffusers(cfg_dict), diffusers_to_ours(sd), {"source": os.path.abspath(path),
                                                                        "format": "diffusers"}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or directory (expected a diffusers folder or a .pt model file)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a model file: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != "rcm-megatron-model":
        raise ValueError(f"{path}: not an rcm-megatron model file (expected keys format='rcm-megatron-model', "
                         "config, model)")
    return WanConfig.from_dict(blob["config"]), blob["model"], {"source": os.path.abspath(path),
                                                                "format": "rcm-megatron-model",
                                                                **blob.get("meta", {})}
