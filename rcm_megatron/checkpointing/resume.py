"""Which checkpoint a training run resumes from, and whether it may write into ``--save`` at all.

``resolve_resume`` (before any process group or model): ``--load``'s checkpoint; with
``--auto-resume`` the ``--save`` root's newest complete checkpoint, taking the marker's when it
is complete and else (marker missing, or naming a folder that is gone or incomplete) the newest
one whose files are all there at their recorded sizes, with its metadata and common state
verified, saying so. A fresh run (nothing to
resume) into a ``--save`` that holds checkpoints is refused: rotation and new commits would mix
two runs and delete the old one's work.

``verified_resume`` (after the process group exists, every rank): the checksums of the chosen
checkpoint, each file hashed by one rank; with ``--auto-resume`` a checkpoint that fails falls
back to the next older one that verifies, saying so.
"""

from __future__ import annotations

import os
import sys

from .checksums import verify_checkpoint, verify_folder
from .errors import CheckpointError
from .layout import MARKER, checkpoint_path, committed_iterations, iteration_dir, iteration_of, latest_iteration


def _warn(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def _complete(path: str) -> str | None:
    """None when every recorded file is there at its size and the small ones (metadata, common
    state) verify, else why not."""
    try:
        verify_folder(path, metadata_only=True)
        return None
    except CheckpointError as e:
        return str(e)


def _newest_complete(root: str, below: int | None = None) -> tuple[str | None, list[str]]:
    problems = []
    for it in reversed(committed_iterations(root)):
        if below is not None and it >= below:
            continue
        path = iteration_dir(root, it)
        why = _complete(path)
        if why is None:
            return path, problems
        problems.append(why)
    return None, problems


def resolve_resume(load: str | None, save: str | None, auto_resume: bool) -> str | None:
    """The checkpoint folder to resume from, or None for a fresh start (see the module doc)."""
    if load is not None:
        try:
            path = checkpoint_path(load)
        except CheckpointError as e:
            raise CheckpointError(f"--load: {e}") from e
        why = _complete(path)
        if why is not None and not auto_resume:
            raise CheckpointError(f"--load: {why}")
        if why is None:
            return path
        _warn(f"--load {load}: {why}")
        fallback, _ = _newest_complete(os.path.dirname(path), below=iteration_of(path))
        if fallback is None:
            raise CheckpointError(f"--load: {why}; no older complete checkpoint in {load}")
        _warn(f"--auto-resume: resuming from {fallback} instead")
        return fallback
    if not save or not os.path.isdir(save):
        return None
    present = committed_iterations(save)
    has_marker = os.path.isfile(os.path.join(save, MARKER))
    if auto_resume and (present or has_marker):
        marked, why = None, None
        try:
            marked = checkpoint_path(save) if has_marker else None
            why = _complete(marked) if marked else f"{os.path.join(save, MARKER)} is missing"
        except CheckpointError as e:
            why = str(e)
        if why is None:
            return marked
        newest, problems = _newest_complete(save)
        if newest is not None:
            _warn(f"--auto-resume: {why}; resuming from the newest complete checkpoint {newest}")
            return newest
        raise CheckpointError(f"--auto-resume: --save {save} holds checkpoints but none is complete ({why}; "
                              f"{'; '.join(problems)}); move them away or pass another --save")
    if present or has_marker:
        newest = iteration_dir(save, latest_iteration(save) if has_marker else present[-1])
        raise CheckpointError(f"--save {save} already holds checkpoints (newest: {newest}); resume with --load {save} "
                              f"(or --auto-resume), or start elsewhere with another --save")
    return None


def verified_resume(path: str, fallback: bool) -> str:
    """``path`` once its checksums verify (a collective); with ``fallback`` the newest older
    checkpoint of the same root that verifies, saying so."""
    try:
        verify_checkpoint(path)
        return path
    except CheckpointError as e:
        if not fallback:
            raise
        error = str(e)
    root, it = os.path.dirname(path), iteration_of(path)
    for older in reversed([i for i in committed_iterations(root) if i < it]):
        candidate = iteration_dir(root, older)
        try:
            verify_checkpoint(candidate)
        except CheckpointError as e:
            _warn(f"--auto-resume: {e}")
            continue
        _warn(f"--auto-resume: {error}; resuming from the newest checkpoint that verifies, {candidate}")
        return candidate
    raise CheckpointError(f"{error}; no older checkpoint in {root} verifies")
