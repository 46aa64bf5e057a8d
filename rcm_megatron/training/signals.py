"""Signals that end a run at the next iteration boundary, after a save: SIGTERM and SIGUSR1
(SLURM pre-emption). The handler only records the request; the loop agrees on it over all
ranks, saves, and exits."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Context manager: installs the handlers, restores the previous ones on exit."""

    def __init__(self):
        self.signal: str | None = None  # name of the first stop signal received
        self._old = {}

    def _on_signal(self, signum, _frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name

    def __enter__(self) -> "StopRequests":
        self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
