"""Single-file models (a pretrained teacher such as ``assets/toy_teacher.pt``, or one exported by
``tools/export_teacher.py``): one torch file {"format", "config", "model", "meta"}."""

from __future__ import annotations

import os

import torch

MODEL_FILE_FORMAT = "rcm-megatron-model"


def save_model_file(path: str, config_dict: dict, state_dict: dict, meta: dict | None = None) -> None:
    """A single model: {"config", "model", "meta"}, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"format": MODEL_FILE_FORMAT, "config": config_dict, "model": state_dict, "meta": meta or {}}, tmp)
    os.replace(tmp, path)


def is_model_file_blob(blob) -> bool:
    return isinstance(blob, dict) and blob.get("format") == MODEL_FILE_FORMAT
