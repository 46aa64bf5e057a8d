"""A CRC-32 of every file of a checkpoint: computed while the shards are written, recorded at
commit, verified before a load.

Writing: megatron-core's shard writer (``filesystem_async``, in this process on CPU, in forked
writer processes on GPU) opens each ``.distcp`` file through the module's ``open``; we give it
one that hashes the bytes as they pass (``zlib.crc32``, streaming, no second read) and leaves
``<file>.crc32`` beside the file when it is closed. At commit rank 0 gathers those into
``checksums.json`` (name -> size, crc32) and hashes the few small files written otherwise
(``common.pt``, ``metadata.json``, ``.metadata``); the sidecars are removed.

Verifying: every rank checks that each listed file exists with its recorded size (a stat), and
hashes its share of the files (file k by rank k mod world), so a checkpoint is read once in all,
spread over the ranks. Any fault is one ``CheckpointError`` naming the file and the checkpoint.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib

from .errors import CheckpointError

MANIFEST = "checksums.json"
SIDECAR = ".crc32"
CHUNK = 8 << 20
SHARD_SUFFIX = ".distcp"  # the tensor shards; the other files (metadata, common state) are small
HASH_SECONDS = [0.0]  # CPU seconds spent in the streaming CRC-32 by this process (summed over threads)
_LOCK = threading.Lock()


class _HashingFile:
    """A binary file opened for writing whose bytes are hashed on the way (sequential writes)."""

    def __init__(self, path: str, mode: str):
        self._f = open(path, mode)
        self.path, self.crc, self.size = path, 0, 0

    def write(self, data) -> int:
        n = self._f.write(data)
        view = memoryview(data).cast("B")
        t0 = time.perf_counter()
        self.crc = zlib.crc32(view[:n], self.crc)
        dt = time.perf_counter() - t0
        with _LOCK:
            HASH_SECONDS[0] += dt
        self.size += n
        return n

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        with open(self.path + SIDECAR, "w") as f:
            json.dump({"size": self.size, "crc32": self.crc}, f)

    def __getattr__(self, name):  # tell, flush, fileno, closed, ...
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # a failed write leaves no sidecar: the file is hashed (or refused) at commit
            self._f.close()


def _hashing_open(path, mode="r", *args, **kwargs):
    if mode in ("wb", "xb") and not args and not kwargs:
        return _HashingFile(path, mode)
    return open(path, mode, *args, **kwargs)


def install_write_hashing() -> None:
    """Route megatron-core's shard-file writes through ``_HashingFile`` (idempotent; inherited
    by its forked writer processes)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.open = _hashing_open


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: str) -> dict:
    """Rank 0 at commit: ``checksums.json`` for every file of ``folder`` (written, fsynced)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(SIDECAR) or name == MANIFEST or not os.path.isfile(path):
            continue
        size, crc = os.path.getsize(path), None
        if os.path.isfile(path + SIDECAR):
            with open(path + SIDECAR) as f:
                rec = json.load(f)
            if rec["size"] == size:
                crc = rec["crc32"]
        files[name] = {"size": size, "crc32": file_crc32(path) if crc is None else crc}
    manifest = {"algorithm": "crc32", "files": files}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))
    for name in os.listdir(folder):
        if name.endswith(SIDECAR):
            os.remove(os.path.join(folder, name))
    return manifest


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (checkpoint {folder} has no checksums: not committed completely, "
                              "or by a version before checksums; for the latter: tools/convert_checkpoint.py verify "
                              "--record)")
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not all(isinstance(r["size"], int) and isinstance(r["crc32"], int) for r in files.values()):
            raise ValueError("size / crc32 not integers")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable checksum list of checkpoint {folder} ({e})") from e
    return files


def verify_folder(folder: str, rank: int = 0, world: int = 1, metadata_only: bool = False) -> int:
    """Check every file's presence and size, and hash this rank's share of the files (with
    ``metadata_only``: every file but the tensor shards, i.e. the metadata and common state);
    returns the number hashed."""
    files = read_manifest(folder)
    hashed = 0
    for k, (name, rec) in enumerate(sorted(files.items())):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (checkpoint {folder})")
        size = os.path.getsize(path)
        if size != rec["size"]:
            raise CheckpointError(f"{path}: {size} bytes, {rec['size']} were written (truncated or altered; "
                                  f"checkpoint {folder})")
        if (not name.endswith(SHARD_SUFFIX)) if metadata_only else (k % world == rank):
            if file_crc32(path) != rec["crc32"]:
                raise CheckpointError(f"{path}: checksum mismatch, the file's content changed since it was written "
                                      f"(checkpoint {folder})")
            hashed += 1
    return hashed


def verify_checkpoint(folder: str) -> None:
    """Every rank of the current process group (or this process alone) verifies its share;
    all raise the same error when any share fails (a collective when a group exists)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        verify_folder(folder)
        return
    error = None
    try:
        verify_folder(folder, dist.get_rank(), dist.get_world_size())
    except CheckpointError as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise CheckpointError(first)
