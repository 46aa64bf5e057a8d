"""The command-line parser of pretrain_rcm.py and tools/: argparse with two conventions.

- No abbreviations: ``--train-iter`` is an error, not a silent ``--train-iters`` (a later flag
  sharing the prefix would change what old commands mean).
- Negative numbers are values: ``--lr -1e-3`` reaches validation, which names the flag. Python
  before 3.12 reads ``-1e-3`` (scientific notation) as an unknown flag; the matcher here is the
  one of later Pythons, restricted to numbers. No flag of ours looks like a negative number.
"""

from __future__ import annotations

import argparse
import re

NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with ``allow_abbrev=False`` and negative numbers read as values;
    subcommand parsers (``add_subparsers``) are of this class too."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER
