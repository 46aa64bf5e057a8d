"""Run a function on N CPU processes joined by gloo, with megatron-core's parallel groups.

    from distributed_utils import run_distributed
    results = run_distributed(fn, 4, ParallelConfig(tensor_model_parallel_size=2), arg1, key=val)

``fn(*args, **kwargs)`` runs on every rank after ``initialize_distributed(config)`` (the same
call the trainer makes, under torchrun-style environment variables); the return values come
back as a list indexed by global rank (anything ``torch.save`` can write: tensors, dicts,
numbers). An exception on any rank stops all of them and is raised here with every failing
rank's traceback. ``fn`` must be importable by name (a module-level function of a test
module).

The ranks are started with the ``forkserver`` method: one server process per pytest session
imports torch, megatron-core and the package once (``_PRELOAD``) and forks every rank from that
clean state, so a rank skips the ~4.5 s of CPU that a ``spawn``ed interpreter spends importing
them (the suite starts a few hundred ranks on 2 cores). The server never runs a test, so a rank
starts from the same state a fresh interpreter would, with the caller's environment at the call.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what every rank imports anyway (the trainer's parallel stack and the models); a module that fails
# to import here is skipped by multiprocessing and imported by the rank itself
_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state", "rcm_megatron.parallel.initialize",
            "rcm_megatron.models", "rcm_megatron.parallel.tensor_parallel"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(rank, world_size, port, fn, config, payload, results, threads, environ):
    os.environ.clear()
    os.environ.update(environ)  # the caller's environment now, not the server's at its start
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        args, kwargs = torch.load(io.BytesIO(payload), weights_only=False)
        from rcm_megatron.parallel.initialize import destroy_distributed, initialize_distributed

        initialize_distributed(config)
        try:
            out = fn(*args, **kwargs)
        finally:
            destroy_distributed()
        results.put((rank, "ok", _to_bytes(out)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, config=None, *args, timeout: float = 300.0, threads: int = 1,
                    **kwargs) -> list:
    """``fn(*args, **kwargs)`` on ``world_size`` gloo ranks initialized with ``config``
    (a ParallelConfig; default: all sizes 1, pure data parallelism). Returns per-rank results."""
    from rcm_megatron.parallel.config import ParallelConfig

    config = ParallelConfig() if config is None else config
    if config.distributed_backend is None:
        config.distributed_backend = "gloo"
    config.distributed_timeout_minutes = min(config.distributed_timeout_minutes, 2)
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    # arguments as bytes: pickled as they are, their tensors would each travel as a shared-memory
    # file descriptor, and a forkserver passes at most a few hundred descriptors to a child
    payload = _to_bytes((args, kwargs))
    procs = [ctx.Process(target=_worker, daemon=False,
                         args=(r, world_size, port, fn, config, payload, results, threads, dict(os.environ)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outputs, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if errors:
                    break
                raise TimeoutError(f"{world_size - len(outputs) - len(errors)} of {world_size} ranks did not "
                                   f"finish within {timeout:.0f} s (a rank blocked in a collective?)")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode is not None and r not in outputs and r not in errors]
                if dead and results.empty():
                    time.sleep(0.5)  # a result may still be in flight
                    if results.empty():
                        raise RuntimeError(f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) "
                                           "without reporting a result") from None
                continue
            if status == "ok":
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                # The others may be blocked in a collective with the failed rank: give them a
                # moment to report their own errors, then stop them.
                deadline = min(deadline, time.monotonic() + 3.0)
    finally:
        if errors or len(outputs) < world_size:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join(timeout=30)
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"run_distributed({getattr(fn, '__name__', fn)}) failed on ranks "
                           f"{sorted(errors)}:\n{report}")
    return [outputs[r] for r in range(world_size)]
