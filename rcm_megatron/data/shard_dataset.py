"""Random access to the samples of a shard set by global sample index (``shards.py``)."""

from __future__ import annotations

import bisect
import os
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from .conditions import FIELDS
from .datasets import DEFAULT_MAX_LATENT_MAGNITUDE, LatentDataset, check_max_latent_magnitude, latent_problem
from .shard_files import (NEGATIVE_FILE, REQUIRED_MEMBERS, BadSample, _shard_count, _warn, load_tensor,
                          read_dataset_meta, read_shard_index, resolve_shards)


class ShardDataset(LatentDataset):
    """Random access to the samples of a shard set by global index (see the module docstring).

    ``dataset[i]`` -> {"latents" [C,T,H,W], "context" [text_len, D] (zero-padded), "prompt"}
    in ``dtype``; a bad sample is replaced by the next valid one (``bad_samples`` counts them).
    Also usable with the trainer's ``global_batch_indices`` as a map-style dataset.
    """

    def __init__(self, data, dtype: torch.dtype = torch.float32, max_open_files: int = 64, index_threads: int = 8,
                 max_latent_magnitude: float = DEFAULT_MAX_LATENT_MAGNITUDE):
        self.spec = data
        self.urls = resolve_shards(data)
        self.root = os.path.dirname(os.path.abspath(self.urls[0]))
        self.meta = read_dataset_meta(self.root)
        self.latent_shape = tuple(int(s) for s in self.meta["latent_shape"])
        self.text_len, self.text_dim = int(self.meta["text_len"]), int(self.meta["text_dim"])
        # image-to-video fields and their per-sample shapes (meta.json "conditions"; none for T2V)
        self.condition_shapes = {k: tuple(int(d) for d in v) for k, v in (self.meta.get("conditions") or {}).items()}
        unknown = sorted(set(self.condition_shapes) - set(FIELDS))
        if unknown:
            raise ValueError(f"{self.root}/meta.json: unknown condition field(s) {unknown}; expected some of "
                             f"{list(FIELDS)}")
        self.conditions = tuple(f for f in FIELDS if f in self.condition_shapes)
        if "condition" in self.condition_shapes:
            self.condition_channels = self.condition_shapes["condition"][0]
        if "image_embeds" in self.condition_shapes:
            self.image_dim = self.condition_shapes["image_embeds"][-1]
        self.dtype = dtype
        neg_path = os.path.join(self.root, NEGATIVE_FILE)
        if not os.path.isfile(neg_path):
            raise FileNotFoundError(f"{neg_path}: missing; the negative-prompt embedding must lie beside the shards")
        neg = torch.load(neg_path, map_location="cpu", weights_only=True)
        self.negative_prompt = neg.get("prompt", "")
        self.negative_context = self._pad_context(neg["context"], neg_path)
        with ThreadPoolExecutor(max(1, index_threads)) as ex:
            health = list(ex.map(_shard_count, self.urls))
        self.counts = [c for c, _ in health]
        # shards that gave no samples (unreadable, truncated, empty) and the samples they recorded
        self.bad_shards = sum(1 for c, _ in health if c == 0)
        self.lost_samples = sum(lost for _, lost in health)
        self.max_latent_magnitude = check_max_latent_magnitude(max_latent_magnitude)
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        self.num_samples = self.offsets[-1]
        if self.num_samples == 0:
            raise ValueError(f"--data {data}: the {len(self.urls)} shard(s) hold no samples")
        self.bad_samples = self.lost_samples
        self._bad: set[int] = set()
        self._lock = threading.Lock()
        self._tables: OrderedDict[int, list] = OrderedDict()
        self._fds: OrderedDict[int, list[int]] = OrderedDict()  # shard -> [fd, readers]
        self._max_open = max(1, int(max_open_files))

    def __len__(self) -> int:
        return self.num_samples

    def fingerprint(self) -> dict:
        return {"num_samples": self.num_samples, "num_shards": len(self.urls),
                "first": os.path.basename(self.urls[0]), "last": os.path.basename(self.urls[-1])}

    # ------------------------------------------------------------------ raw access
    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} outside 0..{self.num_samples - 1}")
        s = bisect.bisect_right(self.offsets, index) - 1
        return s, index - self.offsets[s]

    def _table(self, s: int) -> list:
        with self._lock:
            t = self._tables.get(s)
            if t is not None:
                self._tables.move_to_end(s)
                return t
        t = read_shard_index(self.urls[s])
        if len(t) != self.counts[s]:
            raise RuntimeError(f"{self.urls[s]}: holds {len(t)} samples, {self.counts[s]} when the loader "
                               "started; shards must not change during training")
        with self._lock:
            self._tables[s] = t
            while len(self._tables) > self._max_open:
                self._tables.popitem(last=False)
        return t

    def _acquire(self, s: int) -> int:
        """An open fd of shard ``s``, reference-counted: an fd is closed only when no reader holds it
        (closing one in use could let the number be reused by another file mid-read)."""
        with self._lock:
            entry = self._fds.get(s)
            if entry is None:
                entry = self._fds[s] = [os.open(self.urls[s], os.O_RDONLY), 0]
            self._fds.move_to_end(s)
            entry[1] += 1
            if len(self._fds) > self._max_open:
                for old in [k for k, (_, refs) in self._fds.items() if refs == 0 and k != s]:
                    os.close(self._fds.pop(old)[0])
                    if len(self._fds) <= self._max_open:
                        break
            return entry[0]

    def _release(self, s: int) -> None:
        with self._lock:
            self._fds[s][1] -= 1

    def read_raw(self, index: int) -> tuple[str, dict[str, bytes]]:
        """(key, {ext: bytes}) of sample ``index``."""
        s, j = self.locate(index)
        try:
            key, members = self._table(s)[j]
            fd = self._acquire(s)
        except (OSError, tarfile.TarError) as e:  # a vanished or corrupt shard: its samples are bad
            raise BadSample(f"{self.urls[s]}: cannot read shard: {e}") from e
        out = {}
        try:
            for ext, (off, size) in members.items():
                try:
                    data = os.pread(fd, size, off)
                except OSError as e:
                    raise BadSample(f"{self.urls[s]}: cannot read member {key}.{ext}: {e}") from e
                if len(data) != size:
                    raise BadSample(f"{self.urls[s]}: member {key}.{ext} truncated ({len(data)} of {size} bytes)")
                out[ext] = data
        finally:
            self._release(s)
        return key, out

    def _pad_context(self, ctx: torch.Tensor, where: str) -> torch.Tensor:
        if not isinstance(ctx, torch.Tensor) or ctx.dim() != 2 or ctx.shape[1] != self.text_dim:
            shape = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
            raise BadSample(f"{where}: text embedding {shape}, expected [L<={self.text_len}, {self.text_dim}]")
        if ctx.shape[0] > self.text_len:
            raise BadSample(f"{where}: text embedding has {ctx.shape[0]} tokens, more than text_len={self.text_len}")
        out = torch.zeros(self.text_len, self.text_dim, dtype=self.dtype)
        out[: ctx.shape[0]] = ctx.to(self.dtype)
        return out

    def load(self, index: int) -> dict:
        """Sample ``index`` or BadSample."""
        s, _ = self.locate(index)
        key, raw = self.read_raw(index)
        where = f"{self.urls[s]} sample {key!r} (index {index})"
        missing = [m for m in REQUIRED_MEMBERS if m not in raw]
        if missing:
            raise BadSample(f"{where}: missing member(s) {missing}")
        try:
            lat = load_tensor(raw["latents.pth"])
            ctx = load_tensor(raw["context.pth"])
        except Exception as e:
            raise BadSample(f"{where}: cannot decode: {e}") from e
        if not isinstance(lat, torch.Tensor) or tuple(lat.shape) != self.latent_shape:
            shape = tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__
            raise BadSample(f"{where}: latents {shape}, expected {self.latent_shape}")
        context = self._pad_context(ctx, where)
        lat = lat.to(self.dtype)
        problem = latent_problem(lat, context, self.max_latent_magnitude)
        if problem:
            raise BadSample(f"{where}: {problem}")
        prompt = raw["txt"].decode("utf-8", "replace") if "txt" in raw else ""
        return {"latents": lat, "context": context, "prompt": prompt, **self._conditions(raw, where)}

    def _conditions(self, raw: dict, where: str) -> dict:
        """The sample's image-to-video fields, checked against meta.json's shapes (or BadSample)."""
        out = {}
        for name, shape in self.condition_shapes.items():
            if f"{name}.pth" not in raw:
                raise BadSample(f"{where}: missing member {name}.pth (meta.json lists it)")
            try:
                t = load_tensor(raw[f"{name}.pth"])
            except Exception as e:
                raise BadSample(f"{where}: cannot decode {name}: {e}") from e
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise BadSample(f"{where}: {name} {got}, expected {shape}")
            t = t.to(self.dtype)
            if not torch.isfinite(t).all():
                raise BadSample(f"{where}: non-finite values in {name}")
            out[name] = t
        return out

    def __getitem__(self, index: int) -> dict:
        """Sample ``index``, or the next valid one in index order (cyclic) if it is bad."""
        index = int(index)
        for k in range(self.num_samples):
            i = (index + k) % self.num_samples
            if i in self._bad:
                continue
            try:
                return self.load(i)
            except BadSample as e:
                with self._lock:
                    if i not in self._bad:
                        self._bad.add(i)
                        self.bad_samples += 1
                        n = self.bad_samples
                    else:
                        n = 0
                if n and (n <= 20 or n % 100 == 0):
                    _warn(f"skipping bad sample ({n} so far): {e}")
        raise RuntimeError(f"--data {self.spec}: no valid sample in {len(self.urls)} shard(s) "
                           f"({self.num_samples} samples, all bad; first shard {self.urls[0]})")

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
