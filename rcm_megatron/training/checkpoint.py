"""Training checkpoints through megatron-core ``dist_checkpointing``, committed atomically.

Protocol (every rank):
  1. write the sharded state into ``iter_NNNNNNN.tmp/`` (megatron-core, all ranks);
  2. after a barrier, rank 0 renames it to ``iter_NNNNNNN/`` and then replaces
     ``latest_checkpointed_iteration.txt`` (Megatron-LM's marker name) atomically.
A crash (even SIGKILL) before step 2 leaves only a ``.tmp`` folder that nothing loads; the
marker always names a complete checkpoint. On GPU the write is asynchronous (megatron-core's
async request, finalized later by the commit); on CPU a synchronous strategy is used because
megatron-core's default writer synchronizes CUDA.

Model files (a pretrained teacher) are single ``.pt`` files: {"format", "config", "model", "meta"}.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

MARKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: names the file and what is wrong."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_iteration(root: str) -> int | None:
    marker = os.path.join(root, MARKER)
    if not os.path.isfile(marker):
        return None
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}")
    return int(text)


def checkpoint_path(root: str, iteration: int | None = None) -> str:
    """The committed checkpoint folder to load (default: the marker's), verified to be complete."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"{root}: no {MARKER}; no complete checkpoint was committed there")
    path = iteration_dir(root, iteration)
    for required in ("metadata.json", "common.pt"):
        if not os.path.isfile(os.path.join(path, required)):
            raise CheckpointError(f"{path}: missing {required} (partial or corrupt checkpoint)")
    return path


# Classes that may appear in a checkpoint's common state and are safe to unpickle: megatron-core's
# hybrid device optimizer (optimizer CPU offload) keeps its optimizer classes in every param group,
# which torch.load(weights_only=True) refuses (found on 2 H100s).
SAFE_GLOBALS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def read_common(path: str) -> dict:
    """The non-sharded part (configs, iteration) without reading any tensor shard."""
    from megatron.core import dist_checkpointing

    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001 - surface which file is broken
        raise CheckpointError(f"{path}: cannot read the checkpoint's common state: {e}") from e


class _CPUSaveStrategy:
    """megatron-core's torch_dist format, written synchronously and in-process.

    The default writer stages tensors with a CUDA synchronize and forks writer processes;
    on CPU the first fails and the second can deadlock a process that has other threads
    (TensorBoard's writer, OpenMP). Here the same per-bucket writer runs in this process,
    then megatron-core's own finalization (metadata, commit of the DCP plan) follows.
    """

    def __new__(cls):
        import queue

        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        class Strategy(TorchDistSaveShardedStrategy):
            def save(self, sharded_state_dict, checkpoint_dir):
                request = self.async_save(sharded_state_dict, checkpoint_dir)
                if request.async_fn is not None:
                    transform_list = request.async_fn.args[0]
                    _rank, buckets, global_results = request.async_fn_args
                    local, count = queue.Queue(), queue.Queue()
                    results = {}
                    for i, bucket in enumerate(buckets):
                        count.put(i)
                        FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, local, count, True)
                        idx, out = local.get()
                        if isinstance(out, Exception):
                            raise out
                        results[idx] = out
                    global_results.put(results)
                _barrier()
                # megatron-core's finalization broadcasts a failure flag on
                # torch.cuda.current_device(); on a CPU-only run that tensor must live on the CPU.
                real = torch.cuda.current_device
                torch.cuda.current_device = lambda: "cpu"
                try:
                    for fn in request.finalize_fns:
                        fn()
                finally:
                    torch.cuda.current_device = real

        return Strategy("torch_dist", 1, thread_count=1)


class CheckpointManager:
    """Saves and commits checkpoints under ``root``; keeps the newest ``keep_last``."""

    def __init__(self, root: str, keep_last: int | None = None, async_save: bool | None = None):
        self.root, self.keep_last = root, keep_last
        self.async_save = torch.cuda.is_available() if async_save is None else async_save
        self._queue = None
        self._pending: list[int] = []

    def save(self, iteration: int, sharded_state_dict: dict, protect=()) -> None:
        """``protect``: iterations that --keep-last rotation must not delete (the trainer's last
        checkpoint before a run of skipped non-finite steps)."""
        from megatron.core import dist_checkpointing

        self.finalize(blocking=True)  # one save in flight at a time
        final = iteration_dir(self.root, iteration)
        tmp = final + ".tmp"
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        if self.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            request = dist_checkpointing.save(sharded_state_dict, tmp, async_sharded_save=True)
            request.add_finalize_fn(lambda: self._commit(iteration, protect))
            if self._queue is None:
                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(request)
            self._pending.append(iteration)
        else:
            dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy=_CPUSaveStrategy())
            _barrier()
            self._commit(iteration, protect)
            _barrier()

    def finalize(self, blocking: bool = False) -> None:
        """Commit finished asynchronous saves (all ranks must call it at the same points)."""
        if self._queue is not None and self._pending:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
            if blocking or done:
                self._pending = [] if blocking else self._pending[len(done):]

    def _commit(self, iteration: int, protect=()) -> None:
        if _rank() != 0:
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
            kept = {os.path.basename(iteration_dir(self.root, i)) for i in protect}
            for old in (d for d in done[:-self.keep_last] if d not in kept):
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)


def load_sharded(path: str, sharded_state_dict: dict) -> dict:
    from megatron.core import dist_checkpointing

    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return dist_checkpointing.load(sharded_state_dict, path)
    except Exception as e:  # noqa: BLE001 - a missing shard or key: say which checkpoint
        raise CheckpointError(f"{path}: cannot load the sharded state ({type(e).__name__}: {e})") from e


def save_model_file(path: str, config_dict: dict, state_dict: dict, meta: dict | None = None) -> None:
    """A single model (e.g. a pretrained teacher): {"config", "model", "meta"}, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"format": "rcm-megatron-model", "config": config_dict, "model": state_dict, "meta": meta or {}}, tmp)
    os.replace(tmp, path)
