"""One writer per ``--save``: a lease file created atomically, with a heartbeat.

``writer.lease`` in the save directory is created with ``O_CREAT | O_EXCL`` (atomic on local and
NFSv3+/Lustre/GPFS alike; ``flock`` is not honoured by every parallel file system). It holds the
SLURM job id and restart count (when there is one), host, pid, start time and a heartbeat time
that a daemon thread of the holder rewrites (atomic replace) every ``interval`` seconds.

A second trainer finding a live lease exits 2 naming the holder. A lease is taken over, with a
warning, when its heartbeat is older than ``STALE_INTERVALS`` intervals, when its holder is a
process of this host that no longer exists, or when it belongs to this same SLURM job at an
earlier restart (a requeue), or to an earlier trainer of this same process. The takeover renames the old lease away first (only one contender
wins that rename) and then creates a new one exclusively. The lease is removed at exit.

Only global rank 0 (``RANK`` unset or 0) holds it. ``RCM_LEASE_HEARTBEAT_S`` sets the interval
(default 30 s; tests use a short one).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import uuid

from .errors import CheckpointError

LEASE = "writer.lease"
STALE_INTERVALS = 4


def heartbeat_interval() -> float:
    return float(os.environ.get("RCM_LEASE_HEARTBEAT_S", "30"))


def _identity() -> dict:
    return {"slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time()}


def _describe(rec: dict) -> str:
    job = f"SLURM job {rec.get('slurm_job_id')}, " if rec.get("slurm_job_id") else ""
    age = time.time() - float(rec.get("heartbeat", 0))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec.get("start_time", 0))))
    return f"{job}host {rec.get('host')}, pid {rec.get('pid')}, started {started}, last heartbeat {age:.0f} s ago"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _takeover_reason(rec: dict, me: dict, interval: float) -> str | None:
    """Why an existing lease may be taken over (None: it is live and someone else's)."""
    age = time.time() - float(rec.get("heartbeat", 0))
    if age > STALE_INTERVALS * float(rec.get("interval", interval)):
        return f"its heartbeat is {age:.0f} s old"
    if rec.get("host") == me["host"] and not _pid_alive(rec.get("pid")):
        return f"process {rec.get('pid')} on this host is gone"
    if rec.get("host") == me["host"] and rec.get("pid") == me["pid"]:
        return "an earlier trainer of this same process held it"
    if me["slurm_job_id"] and rec.get("slurm_job_id") == me["slurm_job_id"] and \
            str(rec.get("slurm_restart_count")) != str(me["slurm_restart_count"]):
        return f"it is this SLURM job ({me['slurm_job_id']}) before its requeue"
    return None


class WriterLease:
    """The held lease of one save directory; ``release()`` (also at exit) removes it."""

    def __init__(self, directory: str, interval: float | None = None):
        self.path = os.path.join(directory, LEASE)
        self.interval = heartbeat_interval() if interval is None else interval
        self.record = {**_identity(), "token": uuid.uuid4().hex, "interval": self.interval}
        self._stop = threading.Event()
        self._thread = None
        self.lost = False

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written or garbage: its age decides (heartbeat 0: stale)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.record, "heartbeat": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> "WriterLease":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            rec = self._read()
            if rec is None:
                continue  # released meanwhile
            why = _takeover_reason(rec, self.record, self.interval)
            if why is None:
                raise CheckpointError(f"--save {os.path.dirname(self.path)} is being written by another trainer "
                                      f"({_describe(rec)}; lease {self.path}); stop it or pass another --save")
            stale = f"{self.path}.stale.{self.record['token']}"
            try:
                os.rename(self.path, stale)  # one contender wins
            except FileNotFoundError:
                continue
            os.remove(stale)
            print(f"warning: taking over the lease {self.path} ({why}; was {_describe(rec)})", file=sys.stderr,
                  flush=True)
        else:
            raise CheckpointError(f"{self.path}: could not acquire the writer lease (contended)")
        self._thread = threading.Thread(target=self._beat, name="writer-lease-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            rec = self._read()
            if not rec or rec.get("token") != self.record["token"]:
                self.lost = True
                print(f"warning: the writer lease {self.path} was taken over by another trainer", file=sys.stderr,
                      flush=True)
                return
            tmp = f"{self.path}.{self.record['token']}.tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump({**self.record, "heartbeat": time.time()}, f)
                os.replace(tmp, self.path)
            except OSError as e:  # a full disk must not stop training; the lease may go stale
                print(f"warning: writer lease heartbeat failed ({e})", file=sys.stderr, flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        rec = self._read()
        if rec and rec.get("token") == self.record["token"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def acquire_writer_lease(save: str | None) -> WriterLease | None:
    """The lease of ``save`` for global rank 0 of a training run (None elsewhere or without --save)."""
    if not save or int(os.environ.get("RANK", "0")) != 0:
        return None
    return WriterLease(save).acquire()
