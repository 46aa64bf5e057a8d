"""Output directories checked before any model is built: writable, and ``--save`` with room for
one checkpoint, its size estimated from the architecture (no model is allocated: the parameter
count comes from a meta-device build)."""

from __future__ import annotations

import os
import shutil
import tempfile

from .errors import CheckpointError

SLACK = 1.1  # dist_checkpointing's per-tensor headers and the common state


def checkpoint_bytes(cfg, backend: str = "local", bf16: bool = False, fake_score: bool = True) -> int:
    """Bytes of one training checkpoint (``save_report.expected_bytes``: weights, fp32 EMA, optimizer
    state of the student and, with ``fake_score``, the fake score) for the trained-model backend
    ('local', 'megatron', 'fsdp'); Wan-1.3B with the distributed optimizer and bf16: 45.4 GB."""
    from .save_report import expected_bytes
    from .sources import full_shapes

    n = 0
    for shape in full_shapes(cfg).values():
        k = 1
        for s in shape:
            k *= int(s)
        n += k
    return int(sum(expected_bytes(n, backend, bf16, fake_score).values()) * SLACK)


def check_writable(path: str, flag: str) -> None:
    """Create ``path`` if needed and write and remove a probe file in it."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"{flag} {path}: not writable ({e.strerror or e})") from e


def check_output_dirs(save: str | None, log_dir: str | None, checkpoint_size: int | None) -> None:
    """``--log-dir`` and ``--save`` writable; ``--save`` with free space for one checkpoint."""
    if log_dir:
        check_writable(log_dir, "--log-dir")
    if save:
        check_writable(save, "--save")
        if checkpoint_size:
            free = shutil.disk_usage(save).free
            if free < checkpoint_size:
                raise CheckpointError(f"--save {save}: {free / 1e9:.3f} GB free, one checkpoint of this run needs about "
                                      f"{checkpoint_size / 1e9:.3f} GB")
