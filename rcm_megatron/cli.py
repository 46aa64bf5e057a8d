"""What pretrain_rcm.py and the tools share on the command line.

- No abbreviations: ``--train-iter`` is an error, not a silent ``--train-iters`` (a later flag
  sharing the prefix would change what old commands mean).
- Negative numbers are values: ``--lr -1e-3`` reaches validation, which names the flag. Python
  before 3.12 reads ``-1e-3`` (scientific notation) as an unknown flag; the matcher here is the
  one of later Pythons, restricted to numbers. No flag of ours looks like a negative number.
- Quiet imports of megatron-core, and output files that follow the umask.
"""

from __future__ import annotations

import argparse
import os
import re
import warnings

NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with ``allow_abbrev=False`` and negative numbers read as values;
    subcommand parsers (``add_subparsers``) are of this class too."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER


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
