"""Training checkpoints through megatron-core ``dist_checkpointing``, committed atomically.

Protocol (every rank):
  1. write the sharded state into ``iter_NNNNNNN.tmp/`` (megatron-core, all ranks);
  2. after a barrier, rank 0 renames it to ``iter_NNNNNNN/`` and then replaces
     ``latest_checkpointed_iteration.txt`` (Megatron-LM's marker name) atomically.
A crash (even SIGKILL) before step 2 leaves only a ``.tmp`` folder that nothing loads; the
marker always names a complete checkpoint. On GPU the write is asynchronous (megatron-core's
async request, finalized later by the commit); on CPU a synchronous strategy is used because
megatron-core's default writer synchronizes CUDA.
"""

from __future__ import annotations

import os
import shutil

import torch

from .dist_io import barrier, cpu_save_strategy, rank
from .layout import MARKER, iteration_dir


class CheckpointManager:
    """Saves and commits checkpoints under ``root``; keeps the newest ``keep_last``."""

    def __init__(self, root: str, keep_last: int | None = None, async_save: bool | None = None):
        self.root, self.keep_last = root, keep_last
        self.async_save = torch.cuda.is_available() if async_save is None else async_save
        self._queue = None
        self._pending: list[int] = []

    def save(self, iteration: int, sharded_state_dict: dict) -> None:
        from megatron.core import dist_checkpointing

        self.finalize(blocking=True)  # one save in flight at a time
        final = iteration_dir(self.root, iteration)
        tmp = final + ".tmp"
        if rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        if self.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            request = dist_checkpointing.save(sharded_state_dict, tmp, async_sharded_save=True)
            request.add_finalize_fn(lambda: self.commit(iteration))
            if self._queue is None:
                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(request)
            self._pending.append(iteration)
        else:
            dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy=cpu_save_strategy())
            barrier()
            self.commit(iteration)
            barrier()

    def finalize(self, blocking: bool = False) -> None:
        """Commit finished asynchronous saves (all ranks must call it at the same points)."""
        if self._queue is not None and self._pending:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
            if blocking or done:
                self._pending = [] if blocking else self._pending[len(done):]

    def commit(self, iteration: int) -> None:
        """Rank 0: the written ``.tmp`` folder becomes ``iter_NNNNNNN`` and the marker names it."""
        if rank() != 0:
            return
        final = iteration_dir(self.root, iteration)
        tmp = final + ".tmp"
        if os.path.exists(final):  # re-saving an iteration: replace it only once the new one is complete
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        marker_tmp = os.path.join(self.root, MARKER + ".tmp")
        with open(marker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, os.path.join(self.root, MARKER))
        shutil.rmtree(final + ".old", ignore_errors=True)
        if self.keep_last:
            done = sorted(d for d in os.listdir(self.root) if d.startswith("iter_") and d[5:].isdigit())
            for old in done[:-self.keep_last]:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
