"""Where checkpoints live on disk and which one a path means (written once, used by the trainer,
the converter and the evaluation tools).

A checkpoint root (a ``--save`` directory) holds committed ``iter_NNNNNNN/`` folders and
``latest_checkpointed_iteration.txt`` (Megatron-LM's marker name) naming the newest committed
one. A folder is a megatron-core ``dist_checkpointing`` directory (``metadata.json``,
``common.pt`` and the ``.distcp`` shards).
"""

from __future__ import annotations

import os
import re

from .errors import CheckpointError

MARKER = "latest_checkpointed_iteration.txt"
REQUIRED_FILES = ("metadata.json", "common.pt")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def iteration_of(path: str) -> int:
    """The iteration of an ``iter_NNNNNNN`` folder (also ``.old`` / ``.tmp``)."""
    m = re.match(r"iter_(\d+)", os.path.basename(os.path.normpath(path)))
    if m is None:
        raise CheckpointError(f"{path}: not an iter_NNNNNNN checkpoint folder")
    return int(m.group(1))


def latest_iteration(root: str) -> int | None:
    """The marker's iteration (None without a marker)."""
    marker = os.path.join(root, MARKER)
    if not os.path.isfile(marker):
        return None
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}")
    return int(text)


def is_iteration_folder(path: str) -> bool:
    """One committed ``iter_NNNNNNN`` folder (or any dist_checkpointing folder)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in REQUIRED_FILES)


def is_checkpoint_dir(path: str) -> bool:
    """A checkpoint root (with the commit marker) or one committed ``iter_NNNNNNN`` folder."""
    if not os.path.isdir(path):
        return False
    return os.path.isfile(os.path.join(path, MARKER)) or is_iteration_folder(path)


def committed_iterations(root: str) -> list[int]:
    """Iterations with a committed ``iter_NNNNNNN`` folder under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(d[5:]) for d in os.listdir(root)
                  if d.startswith("iter_") and d[5:].isdigit() and os.path.isdir(os.path.join(root, d)))


def checkpoint_path(root: str, iteration: int | None = None) -> str:
    """The committed checkpoint folder to load (default: the marker's), checked to hold its files."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"{root}: no {MARKER}; no complete checkpoint was committed there")
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        if is_iteration_folder(path + ".old"):  # a re-save interrupted between its two renames
            return path + ".old"
        present = committed_iterations(root)
        raise CheckpointError(f"{root}: no checkpoint of iteration {iteration}; present: "
                              f"{', '.join(map(str, present)) if present else 'none'}")
    for required in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(path, required)):
            raise CheckpointError(f"{path}: missing {required} (partial or corrupt checkpoint)")
    return path


def resolve_checkpoint_dir(path: str, iteration: int | None = None) -> str:
    """``path`` itself when it is one iteration folder, else the root's folder for ``iteration``."""
    if iteration is None and is_iteration_folder(path):
        return path
    return checkpoint_path(path, iteration)
