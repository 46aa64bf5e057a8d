"""Training checkpoints: written under a temporary name, committed by an atomic rename and a
``latest_checkpointed_iteration.txt`` marker written last, so a crash mid-save never leaves
something that loads (Megatron-LM's marker name, so its tooling finds our iterations).

This is the single-process format of the foundation; sharded saving through megatron-core
``dist_checkpointing`` (resharding across layouts) builds on the same commit protocol.
"""

from __future__ import annotations

import os
import shutil

import torch

MARKER = "latest_checkpointed_iteration.txt"
STATE_FILE = "train_state.pt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def save_checkpoint(root: str, iteration: int, state: dict, keep_last: int | None = None) -> str:
    os.makedirs(root, exist_ok=True)
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    path = os.path.join(tmp, STATE_FILE)
    torch.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    if os.path.exists(final):  # re-saving the same iteration: move the old one aside first
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    marker_tmp = os.path.join(root, MARKER + ".tmp")
    with open(marker_tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker_tmp, os.path.join(root, MARKER))
    shutil.rmtree(final + ".old", ignore_errors=True)
    if keep_last:
        for old in sorted(d for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_iteration(root: str) -> int | None:
    marker = os.path.join(root, MARKER)
    if not os.path.isfile(marker):
        return None
    text = open(marker).read().strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected an iteration number, found {text!r}")
    return int(text)


def load_checkpoint(root: str, iteration: int | None = None) -> dict:
    """Load ``iteration`` (default: the latest committed) from ``root``; errors name the file."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--load {root}: no such checkpoint directory")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"--load {root}: no {MARKER}; no complete checkpoint was committed there")
    path = os.path.join(iteration_dir(root, iteration), STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--load {root}: {MARKER} names iteration {iteration} but {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt file
        raise ValueError(f"--load: cannot read {path}: {e}") from e


def save_model_file(path: str, config_dict: dict, state_dict: dict, meta: dict | None = None) -> None:
    """A single model (e.g. a pretrained teacher): {"config", "model", "meta"}, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"format": "rcm-megatron-model", "config": config_dict, "model": state_dict, "meta": meta or {}}, tmp)
    os.replace(tmp, path)
