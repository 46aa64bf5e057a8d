"""A torchrun worker stops within seconds when its launcher is gone.

When torchrun (or the SLURM step around it) is killed, its workers are re-parented and would
train on, and keep writing checkpoints into ``--save``, where a requeued job's workers then
write too. A daemon thread polls the parent pid; when it changes, the worker exits at once
without saving (committed checkpoints are complete by construction; a save in progress is
never loaded). Polling rather than ``prctl(PR_SET_PDEATHSIG)``: the death signal follows the
parent *thread* that forked the worker, and Linux only.
"""

from __future__ import annotations

import os
import sys
import threading
import time

POLL_SECONDS = 1.0
LAUNCHER_GONE_EXIT_CODE = 1


def exit_when_launcher_dies(poll_seconds: float = POLL_SECONDS) -> threading.Thread:
    launcher = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != launcher:
                sys.stderr.write(f"pretrain_rcm.py: rank {os.environ.get('RANK', '?')}: the launcher (pid {launcher}) "
                                 "is gone; stopping without saving\n")
                sys.stderr.flush()
                os._exit(LAUNCHER_GONE_EXIT_CODE)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
