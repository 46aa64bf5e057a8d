"""Training checkpoints through megatron-core ``dist_checkpointing``, committed atomically.

Protocol (every rank):
  1. write the sharded state into ``iter_NNNNNNN.tmp/`` (megatron-core, all ranks), each shard
     file hashed as it is written (``checksums``);
  2. after a barrier, rank 0 records the checksums (``checksums.json``), renames the folder to
     ``iter_NNNNNNN/`` and then replaces ``latest_checkpointed_iteration.txt`` (Megatron-LM's
     marker name) atomically.
A crash (even SIGKILL) before step 2 leaves only a ``.tmp`` folder that nothing loads; the
marker always names a complete checkpoint. Re-saving an iteration that exists swaps the two
folders in one ``renameat2(RENAME_EXCHANGE)``, so a complete copy is under the name at every
instant (file systems without it: two renames, and ``layout`` falls back to ``iter_NNNNNNN.old``).
A failed write (a full disk) removes the partial copy and raises one ``CheckpointError`` naming
the folder; the previous checkpoints stay. ``--keep-last`` rotation never removes the marker's
checkpoint nor the ``protected`` iterations the caller names (the last one before a run of
skipped steps). On GPU the write is asynchronous (megatron-core's async request, finalized later
by the commit); on CPU a synchronous strategy is used because megatron-core's default writer
synchronizes CUDA. Either way each rank writes ``thread_count`` files in parallel (megatron-core's
torch_dist writer: forked processes on GPU, threads here). ``report`` (``save_report.SaveReport``)
holds the last committed save's bytes and seconds per phase.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import time

import torch
from torch.distributed.checkpoint.api import CheckpointException

from .checksums import install_write_hashing, write_manifest
from .dist_io import barrier, cpu_save_strategy, default_thread_count, rank
from .errors import CheckpointError
from .layout import MARKER, committed_iterations, iteration_dir, latest_iteration
from .save_report import SaveReport, folder_bytes

RENAME_EXCHANGE = 2


def exchange_folders(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _reason(e: BaseException) -> str:
    """The OS error behind a failed write if there is one (e.g. 'No space left on device')."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}" + (f": {seen.filename}" if seen.filename else "")
        seen = seen.__cause__ or seen.__context__
    return f"{type(e).__name__}: {e}"


class CheckpointManager:
    """Saves and commits checkpoints under ``root``; keeps the newest ``keep_last``."""

    def __init__(self, root: str, keep_last: int | None = None, async_save: bool | None = None,
                 thread_count: int | None = None, on_commit=None, parallel_group=None):
        """``on_commit(report)``: called on rank 0 once a save is committed (the log line).
        ``parallel_group``: the DP (x CP) group whose ranks hold replicas of the same tensors; with
        more than one rank, megatron-core's ``FullyParallelSaveStrategyWrapper`` spreads the writing
        of the replicated tensors over them (``--ckpt-fully-parallel-save``), instead of each
        tensor's first replica (DP rank 0) writing all of them."""
        self.root, self.keep_last, self.on_commit = root, keep_last, on_commit
        self.parallel_group = parallel_group
        self.async_save = torch.cuda.is_available() if async_save is None else async_save
        self.thread_count = thread_count or default_thread_count()
        self._queue = None
        self._pending: list[int] = []
        self._protected: set[int] = set()
        self._reports: dict[int, SaveReport] = {}
        self.report: SaveReport | None = None  # the last committed save's
        install_write_hashing()

    def save(self, iteration: int, sharded_state_dict, protected=()) -> None:
        """Write and commit ``iteration``; ``protected``: iterations rotation must keep.
        ``sharded_state_dict``: the dict, or a function building it (timed as the 'build' phase:
        e.g. megatron-core gathering distributed-optimizer state to the CPU)."""
        from megatron.core import dist_checkpointing

        self.finalize(blocking=True)  # one save in flight at a time
        self._protected = {int(i) for i in protected if i is not None}
        tmp = iteration_dir(self.root, iteration) + ".tmp"
        report = self._reports[iteration] = SaveReport(iteration)
        if callable(sharded_state_dict):
            with report.timed("build"):
                sharded_state_dict = sharded_state_dict()
        try:
            if rank() == 0:
                os.makedirs(self.root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            barrier()
            if self.async_save:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
                from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

                with report.timed("plan+stage"):
                    strategy = self._spread(TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=self.thread_count))
                    request = dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy=strategy,
                                                      async_sharded_save=True)
                request.add_finalize_fn(lambda: self.commit(iteration))
                if self._queue is None:
                    self._queue = AsyncCallsQueue()
                self._queue.schedule_async_request(request)
                self._pending.append(iteration)
                report.blocking_s = time.perf_counter() - report.started
            else:
                dist_checkpointing.save(sharded_state_dict, tmp,
                                        sharded_strategy=self._spread(cpu_save_strategy(self.thread_count, report)))
                barrier()
                self.commit(iteration)
                barrier()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
            self._failed(iteration, e)

    def _spread(self, strategy):
        """The strategy, wrapped to share the replicated tensors' writes over ``parallel_group``."""
        import torch.distributed as dist

        if self.parallel_group is None or dist.get_world_size(self.parallel_group) < 2:
            return strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        return FullyParallelSaveStrategyWrapper(strategy, self.parallel_group)

    def _failed(self, iteration: int, e: BaseException):
        self._reports.pop(iteration, None)
        tmp = iteration_dir(self.root, iteration) + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_iteration(self.root) if os.path.isfile(os.path.join(self.root, MARKER)) else None
        kept = iteration_dir(self.root, kept) if kept is not None else "none was committed"
        raise CheckpointError(f"saving iteration {iteration} to {tmp} failed ({_reason(e)}); the partial copy was "
                              f"removed, the last complete checkpoint ({kept}) is kept") from e

    def finalize(self, blocking: bool = False) -> None:
        """Commit finished asynchronous saves (all ranks must call it at the same points)."""
        if self._queue is not None and self._pending:
            try:
                done = self._queue.maybe_finalize_async_calls(blocking=blocking)
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                self._failed(self._pending[0], e)
            if blocking or done:
                self._pending = [] if blocking else self._pending[len(done):]

    def commit(self, iteration: int) -> None:
        """Rank 0: the written ``.tmp`` folder, with its checksums, becomes ``iter_NNNNNNN`` and the
        marker names it."""
        report = self._reports.pop(iteration, None) or SaveReport(iteration)
        if rank() != 0:
            return
        final = iteration_dir(self.root, iteration)
        tmp = final + ".tmp"
        t0 = time.perf_counter()
        if report.blocking_s is not None:  # asynchronous: the background write ended before this commit
            report.add("write (background)", t0 - report.started - report.blocking_s)
        report.bytes = folder_bytes(tmp)
        write_manifest(tmp)
        if os.path.exists(final):  # re-saving an iteration: the complete old copy stays until swapped
            if exchange_folders(tmp, final):
                shutil.rmtree(tmp)
            else:
                shutil.rmtree(final + ".old", ignore_errors=True)
                os.replace(final, final + ".old")
                os.replace(tmp, final)
        else:
            os.replace(tmp, final)
        marker_tmp = os.path.join(self.root, MARKER + ".tmp")
        with open(marker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, os.path.join(self.root, MARKER))
        shutil.rmtree(final + ".old", ignore_errors=True)
        if self.keep_last:
            self.rotate(iteration)
        report.add("commit", time.perf_counter() - t0)
        report.total_s = time.perf_counter() - report.started
        self.report = report
        if self.on_commit is not None:
            self.on_commit(report)

    def rotate(self, committed: int) -> None:
        """Keep the newest ``keep_last``, the marker's and the protected iterations."""
        keep = set(committed_iterations(self.root)[-self.keep_last:]) | {committed} | self._protected
        for it in committed_iterations(self.root):
            if it not in keep:
                shutil.rmtree(iteration_dir(self.root, it), ignore_errors=True)

    def newest_at_or_before(self, iteration: int) -> int | None:
        """The newest committed iteration <= ``iteration`` (e.g. the last good one before skipped steps)."""
        older = [it for it in committed_iterations(self.root) if it <= iteration]
        return older[-1] if older else None
