"""megatron-core ``dist_checkpointing`` reads and the in-process CPU write strategy.

Every read names the checkpoint folder when it fails. ``process_group`` gives the tools that
run as one plain process (convert, evaluate) the world of one that dist_checkpointing needs.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from .checksums import install_write_hashing
from .errors import CheckpointError

# torch's CheckpointException (a failed read on any rank) is a BaseException: caught by name.
READ_ERRORS = (Exception, CheckpointException)

# Classes that may appear in a checkpoint's common state and are safe to unpickle: megatron-core's
# hybrid device optimizer (optimizer CPU offload) keeps its optimizer classes in every param group,
# which torch.load(weights_only=True) refuses (found on 2 H100s).
SAFE_GLOBALS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def process_group():
    """dist_checkpointing needs a process group: use the current one, or a world of one for the duration."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def read_common(path: str) -> dict:
    """The non-sharded part (configs, iteration) without reading any tensor shard."""
    from megatron.core import dist_checkpointing

    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return dist_checkpointing.load_common_state_dict(path)
    except READ_ERRORS as e:  # noqa: BLE001 - surface which file is broken
        raise CheckpointError(f"{path}: cannot read the checkpoint's common state: {_first_line(e)}") from e


def load_sharded(path: str, sharded_state_dict: dict) -> dict:
    from megatron.core import dist_checkpointing

    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return dist_checkpointing.load(sharded_state_dict, path)
    except READ_ERRORS as e:  # noqa: BLE001 - a missing shard or key: say which checkpoint
        raise CheckpointError(f"{path}: cannot load the sharded state ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


class _CPUSaveStrategy:
    """megatron-core's torch_dist format, written synchronously and in-process.

    The default writer stages tensors with a CUDA synchronize and forks writer processes;
    on CPU the first fails and the second can deadlock a process that has other threads
    (TensorBoard's writer, OpenMP). Here the same per-bucket writer (megatron-core splits the
    tensors into ``thread_count`` files of about equal size) runs in this process, one thread
    per file: the file writes, the CRC-32 and the fsync release the GIL, so files are written
    in parallel. Then megatron-core's own finalization (metadata, commit of the DCP plan)
    follows. ``report``: a ``SaveReport`` that gets the plan / write / finalize seconds.
    """

    def __new__(cls, thread_count: int = 1, report=None):
        import queue
        from concurrent.futures import ThreadPoolExecutor

        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        def timed(phase):
            return report.timed(phase) if report is not None else contextlib.nullcontext()

        def write_bucket(transform_list, i, bucket):
            local, count = queue.Queue(), queue.Queue()
            count.put(i)
            FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, local, count, True)
            return local.get()

        class Strategy(TorchDistSaveShardedStrategy):
            def save(self, sharded_state_dict, checkpoint_dir):
                with timed("plan"):
                    request = self.async_save(sharded_state_dict, checkpoint_dir)
                with timed("write"):
                    if request.async_fn is not None:
                        transform_list = request.async_fn.args[0]
                        _rank, buckets, global_results = request.async_fn_args
                        with ThreadPoolExecutor(max_workers=max(1, len(buckets))) as pool:
                            outs = list(pool.map(lambda ib: write_bucket(transform_list, *ib), enumerate(buckets)))
                        results = {}
                        for idx, out in outs:
                            if isinstance(out, Exception):
                                raise out
                            results[idx] = out
                        global_results.put(results)
                    barrier()
                # megatron-core's finalization broadcasts a failure flag on
                # torch.cuda.current_device(); on a CPU-only run that tensor must live on the CPU.
                real = torch.cuda.current_device
                torch.cuda.current_device = lambda: "cpu"
                try:
                    with timed("finalize"):
                        for fn in request.finalize_fns:
                            fn()
                finally:
                    torch.cuda.current_device = real

        return Strategy("torch_dist", 1, thread_count=thread_count)


def default_thread_count() -> int:
    """Writer threads (files) per rank: megatron-core's default of 2, up to 4 where this rank has the
    cores (the node's cores shared by its local ranks); ``RCM_CKPT_WRITE_THREADS`` overrides it."""
    env = os.environ.get("RCM_CKPT_WRITE_THREADS")
    if env:
        return max(1, int(env))
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, min(4, cores // local))


def cpu_save_strategy(thread_count: int = 1, report=None):
    install_write_hashing()
    return _CPUSaveStrategy(thread_count, report)
