"""The epoch order of a shard set and the prefetching, resumable loader of a data-parallel rank
(``shards.py`` describes both)."""

from __future__ import annotations

import bisect
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from .shard_dataset import ShardDataset
from .shard_files import LOADER_FORMAT


# ----------------------------------------------------------------------------- order
def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class EpochOrder:
    """Position p in the running sample sequence -> global sample index (module docstring)."""

    def __init__(self, counts: list[int], seed: int, shuffle: bool = True, shuffle_window: int = 1024):
        self.counts = list(counts)
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        self.n = self.offsets[-1]
        self.seed, self.shuffle, self.window = int(seed), bool(shuffle), max(1, int(shuffle_window))
        self._epoch_cache: tuple[int, list[int], list[int]] | None = None
        self._window_cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def _epoch(self, e: int):
        if self._epoch_cache is None or self._epoch_cache[0] != e:
            from ..rcm.rng import stable_seed

            order = _perm(len(self.counts), stable_seed(self.seed, e, -1, "shards.order")).tolist()
            cum = [0]
            for s in order:
                cum.append(cum[-1] + self.counts[s])
            self._epoch_cache = (e, order, cum)
        return self._epoch_cache

    def _window_perm(self, e: int, w: int, size: int) -> torch.Tensor:
        key = (e, w)
        p = self._window_cache.get(key)
        if p is None:
            from ..rcm.rng import stable_seed

            p = _perm(size, stable_seed(self.seed, e, w, "shards.window"))
            self._window_cache[key] = p
            while len(self._window_cache) > 8:
                self._window_cache.popitem(last=False)
        return p

    def __call__(self, p: int) -> int:
        e, q = divmod(int(p), self.n)
        if not self.shuffle:
            return q
        _, order, cum = self._epoch(e)
        w, k = divmod(q, self.window)
        start = w * self.window
        size = min(self.window, self.n - start)
        c = start + int(self._window_perm(e, w, size)[k])
        slot = bisect.bisect_right(cum, c) - 1
        return self.offsets[order[slot]] + (c - cum[slot])


# ----------------------------------------------------------------------------- loader
class ShardLoader:
    """Micro-batches of this data-parallel rank, prefetched by a background thread.

    ``next_batch()`` -> {"latents" [mbs,C,T,H,W], "context" [mbs,text_len,D], "index" int64 [mbs]
    (global sample ids), "prompt" list[str]}. ``global_batch_size`` defaults to
    ``micro_batch_size * dp_size``; a rank yields ``global_batch_size / (dp_size * micro_batch_size)``
    micro-batches per iteration. ``state_dict()`` / ``load_state_dict()`` save and restore
    the position; ``set_iteration(it)`` jumps to the start of iteration ``it``.
    """

    def __init__(self, data, dp_rank: int = 0, dp_size: int = 1, micro_batch_size: int = 1, seed: int = 1234,
                 global_batch_size: int | None = None, *, shuffle: bool = True, shuffle_window: int = 1024,
                 prefetch: int = 4, num_threads: int = 4, pin_memory: bool = False, dtype: torch.dtype = torch.float32):
        self.dataset = data if isinstance(data, ShardDataset) else ShardDataset(data, dtype=dtype)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        self.dp_rank, self.dp_size, self.micro_batch_size = int(dp_rank), int(dp_size), int(micro_batch_size)
        self.global_batch_size = int(global_batch_size or micro_batch_size * dp_size)
        if self.micro_batch_size < 1 or self.global_batch_size % (self.micro_batch_size * self.dp_size):
            raise ValueError(f"global batch {self.global_batch_size} must be a positive multiple of "
                             f"micro batch {self.micro_batch_size} x data-parallel size {self.dp_size}")
        self.per_rank = self.global_batch_size // self.dp_size
        self.num_micro_batches = self.per_rank // self.micro_batch_size
        self.seed, self.shuffle, self.shuffle_window = int(seed), bool(shuffle), int(shuffle_window)
        self.order = EpochOrder(self.dataset.counts, self.seed, self.shuffle, self.shuffle_window)
        self.prefetch, self.num_threads = max(1, int(prefetch)), max(1, int(num_threads))
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self._consumed = 0  # micro-batches handed out by next_batch()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ what the trainer reads
    @property
    def negative_context(self) -> torch.Tensor:
        return self.dataset.negative_context

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.dataset.latent_shape

    @property
    def text_dim(self) -> int:
        return self.dataset.text_dim

    @property
    def text_len(self) -> int:
        return self.dataset.text_len

    @property
    def bad_samples(self) -> int:
        return self.dataset.bad_samples

    @property
    def bad_shards(self) -> int:
        """Shards that gave no samples (unreadable, truncated or empty); their samples are in bad_samples."""
        return self.dataset.bad_shards

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def iteration(self) -> int:
        return self._consumed // self.num_micro_batches

    @property
    def epoch(self) -> int:
        return (self._consumed // self.num_micro_batches * self.global_batch_size) // len(self.dataset)

    # ------------------------------------------------------------------ positions
    def positions(self, micro: int) -> list[int]:
        """Sequence positions of this rank's micro-batch number ``micro``."""
        it, m = divmod(int(micro), self.num_micro_batches)
        start = it * self.global_batch_size + self.dp_rank * self.per_rank + m * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))

    def indices(self, micro: int) -> list[int]:
        return [self.order(p) for p in self.positions(micro)]

    def _make(self, micro: int) -> dict:
        idx = self.indices(micro)
        if self._pool is not None and len(idx) > 1:
            items = list(self._pool.map(self.dataset.__getitem__, idx))
        else:
            items = [self.dataset[i] for i in idx]
        batch = {"latents": torch.stack([it["latents"] for it in items]),
                 "context": torch.stack([it["context"] for it in items]),
                 "index": torch.tensor(idx, dtype=torch.int64),
                 "prompt": [it["prompt"] for it in items]}
        for name in self.dataset.conditions:  # image-to-video fields
            batch[name] = torch.stack([it[name] for it in items])
        if self.pin_memory:
            batch["latents"], batch["context"] = batch["latents"].pin_memory(), batch["context"].pin_memory()
        return batch

    # ------------------------------------------------------------------ prefetch thread
    def _worker(self, start: int, q: queue.Queue, stop: threading.Event) -> None:
        micro = start
        while not stop.is_set():
            try:
                item = (micro, self._make(micro), None)
            except BaseException as e:  # hand the error to the consumer
                item = (micro, None, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            micro += 1

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        if self._pool is None and self.num_threads > 1:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="shard-read")
        self._thread = threading.Thread(target=self._worker, args=(self._consumed, self._queue, self._stop),
                                        name="shard-prefetch", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    def next_batch(self) -> dict:
        if self._thread is None:
            self._start()
        micro, batch, err = self._queue.get()
        if micro != self._consumed:  # pragma: no cover - guarded by _halt on every seek
            raise RuntimeError(f"prefetch out of order: got micro-batch {micro}, expected {self._consumed}")
        if err is not None:
            self._thread = None
            raise err
        self._consumed += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def close(self) -> None:
        self._halt()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.dataset.close()

    # ------------------------------------------------------------------ resume
    def set_iteration(self, iteration: int) -> None:
        """Continue at the first micro-batch of ``iteration`` (what a straight run reads there)."""
        self._halt()
        self._consumed = int(iteration) * self.num_micro_batches

    def state_dict(self) -> dict:
        return {"format": LOADER_FORMAT, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_window": self.shuffle_window, "global_batch_size": self.global_batch_size,
                "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size, "dp_rank": self.dp_rank,
                "micro_batches_consumed": self._consumed, "samples_consumed": self._consumed * self.micro_batch_size,
                "iteration": self.iteration, "epoch": self.epoch, "dataset": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position. The dataset, seed, shuffle and global batch must match; the DP
        layout may differ when the state lies on an iteration boundary (the global batch
        sequence does not depend on it)."""
        if state.get("format") != LOADER_FORMAT:
            raise ValueError(f"not a shard loader state (format {state.get('format')!r})")
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("shuffle_window", self.shuffle_window),
                          ("global_batch_size", self.global_batch_size), ("dataset", self.dataset.fingerprint())):
            if state.get(key) != mine:
                raise ValueError(f"shard loader state has {key}={state.get(key)}, this run {mine}; "
                                 "the data position would not resume exactly")
        consumed = int(state["micro_batches_consumed"])
        same_layout = state.get("dp_size") == self.dp_size and state.get("micro_batch_size") == self.micro_batch_size
        if same_layout:
            self._halt()
            self._consumed = consumed
            return
        old_micro = state["global_batch_size"] // (state["dp_size"] * state["micro_batch_size"])
        it, rest = divmod(consumed, old_micro)
        if rest:
            raise ValueError(f"shard loader state is mid-iteration ({rest} of {old_micro} micro-batches); "
                             "it can only be restored with the same dp_size and micro_batch_size")
        self.set_iteration(it)

    def __del__(self):
        try:
            self._halt()
        except Exception:
            pass
