"""What the command-line tools share: quiet imports of megatron-core and output files that follow the umask."""

from __future__ import annotations

import os
import warnings

_TE_APEX = ".*Transformer Engine and Apex are not installed.*"


def quiet_optional_backends() -> None:
    """Silence megatron-core's "Transformer Engine and Apex are not installed" warnings (four per
    process, from as many modules). The tools never need either backend, so the lines only bury the
    tool's own output. Call before anything imports megatron-core."""
    warnings.filterwarnings("ignore", message=_TE_APEX)
    # megatron-core's checkpoint loader calls a torch API torch deprecated; nothing a user can change
    warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)


def follow_umask(path: str) -> None:
    """Give a file we wrote for the user the mode a plain ``open()`` would (0666 minus the umask).

    safetensors writes its files mode 0600 whatever the umask, so an export would be unreadable to
    the rest of a group that shares a model directory."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
