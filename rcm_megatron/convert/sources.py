"""Where a model's weights come from: a diffusers folder, an original Wan2.1 checkpoint, one of
our distributed checkpoints (``tools/convert_checkpoint.py import`` output or a training
``--save``), or one of our model files.

``read_model_source(path)`` returns (WanConfig, full state dict in our names, provenance) and
checks the input before anything is built, so a wrong path or file fails fast with its name.
The architecture comes from the source (config.json, the checkpoint's recorded
``model_config`` or the model file), so ``--teacher-checkpoint`` needs no ``--model``.
For a training checkpoint the power-EMA weights are taken (the student's if there is no EMA).
"""

from __future__ import annotations

import os

import torch

from ..models.config import WanConfig


def read_model_source(path: str) -> tuple[WanConfig, dict, dict]:
    """(config, state_dict, provenance) of a teacher/student source."""
    from .loading import open_source, read_full_state_dict

    if os.path.isdir(path):
        with open_source(path) as src:
            return src.config, read_full_state_dict(src), src.provenance
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or directory (expected a diffusers folder, an rcm-megatron "
                                "checkpoint directory, a .pt model file or an original Wan2.1 .pth/.safetensors)")
    if path.endswith(".safetensors"):
        with open_source(path, kind="wan") as src:
            return src.config, read_full_state_dict(src), src.provenance
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a model file: {e}") from e
    if isinstance(blob, dict) and blob.get("format") == "rcm-megatron-model":
        return WanConfig.from_dict(blob["config"]), blob["model"], {"source": os.path.abspath(path),
                                                                    "format": "rcm-megatron-model",
                                                                    **blob.get("meta", {})}
    if isinstance(blob, dict) and any(str(k).endswith("patch_embedding.weight") for k in blob):
        del blob  # an original Wan2.1 state dict: read through the name map
        with open_source(path, kind="wan") as src:
            return src.config, read_full_state_dict(src), src.provenance
    raise ValueError(f"{path}: not an rcm-megatron model file (expected keys format='rcm-megatron-model', "
                     "config, model) nor an original Wan2.1 state dict")
