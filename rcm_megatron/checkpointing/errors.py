"""The two errors of reading and writing weights; both are ``ValueError`` so a tool's one
``except`` turns them into one line and exit code 2."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: names the file and what is wrong."""


class ConversionError(ValueError):
    """Input that does not match what it should be: names the file and every problem."""
