"""Signals that end a run at the next iteration boundary, after a save: SIGTERM and SIGUSR1
(SLURM pre-emption) and the first Ctrl-C (SIGINT; the run then exits with code 130). The
handler only records the request; the loop agrees on it over all ranks, saves, and exits.

A second Ctrl-C aborts at once, without saving (committed checkpoints are complete by
construction; a save in progress is never loaded). Under torchrun one Ctrl-C reaches a worker
twice, from the terminal and forwarded by the launcher, so a SIGINT within
``SIGINT_REPEAT_SECONDS`` of the first counts as the same one.
"""

from __future__ import annotations

import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SIGINT_REPEAT_SECONDS = 1.0
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shell's convention


class StopRequests:
    """Context manager: installs the handlers, restores the previous ones on exit."""

    def __init__(self):
        self.signal: str | None = None  # name of the first stop signal received
        self._first_interrupt: float | None = None
        self._old = {}

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is not None:
                if now - self._first_interrupt > SIGINT_REPEAT_SECONDS:
                    sys.stderr.write("second interrupt: aborting without saving\n")
                    sys.stderr.flush()
                    os._exit(INTERRUPTED_EXIT_CODE)
                return
            self._first_interrupt = now
            sys.stderr.write("interrupt: saving at the end of this iteration, then exiting "
                             "(press Ctrl-C again to abort without saving)\n")
            sys.stderr.flush()
        self.signal = self.signal or signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """The process exit code for a run that ended on this request (0 if none or not SIGINT)."""
        return INTERRUPTED_EXIT_CODE if self.signal == "SIGINT" else 0

    def __enter__(self) -> "StopRequests":
        self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
