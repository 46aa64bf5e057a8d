"""Webdataset tar shards of training latents, and a loader over them that is sharded over
data-parallel ranks, shuffled by seed and epoch, prefetched, and exactly resumable.

A dataset directory (written by ``tools/prepare_data.py`` or ``tools/synthesize_data.py``)::

    meta.json                       {"format": "rcm-megatron-shards/1", "latent_shape": [C,T,H,W],
                                     "text_len": 512, "text_dim": 4096, ...provenance}
    negative_context.pth            {"context": [L_neg, D], "prompt": str}  (the CFG negative prompt)
    shard-000000.tar                webdataset samples, one key each:
                                      KEY.latents.pth  [C,T,H,W] (bf16 by default)
                                      KEY.context.pth  [L_i, D]  the prompt's L_i <= text_len tokens
                                      KEY.txt          the prompt
                                      KEY.json         provenance (source file, frames, fps, ...)
    shard-000000.tar.index.json     member offsets of that shard, written with it

Text embeddings are stored without padding and zero-padded to ``text_len`` on load (Wan
pads umT5 outputs with zeros to 512), which keeps shards ~2x smaller.

**Global sample index.** Shards are ordered by path; sample j of shard s has index
``offset[s] + j`` (offset = running count over the ordered shards): dense 0..N-1, the same
on every rank and after every restart, so the layout-invariant RNG can key draws by it.
It changes only if the shard set changes (``state_dict`` records N and refuses another).

**Order.** One global sequence per epoch, a function of (seed, epoch) only: the shard order
is permuted, the concatenated samples are cut into windows of ``shuffle_window`` and each
window is permuted. Global batch k is positions [k B, (k+1) B) of the running sequence
(epochs follow each other without a gap); DP rank r takes its contiguous B/dp slice and
cuts it into micro-batches. So the *global* batch does not depend on the DP size, and TP,
CP and PP peers of one DP rank get the same samples (they pass the same ``dp_rank``). The
position is just the number of micro-batches consumed: ``state_dict`` saves it and
``load_state_dict`` restores it with no replay of earlier samples.

**Why not webdataset's reader.** ``webdataset.WebDataset`` streams shards through a
shuffle buffer: its order depends on read timing and buffer state, so it cannot resume
at an exact sample without replaying the epoch, and it splits by shard, so DP ranks see
different amounts of data. ``wids`` (webdataset's indexed reader) gives random access but
copies shards to a local cache and prints on construction. Shards are written with
``webdataset.TarWriter`` (standard webdataset layout, readable by any webdataset tool);
reading uses the member offsets recorded at write time (``os.pread``, thread-safe, one
read per member) so any position maps straight to a sample.

**Bad samples** (unreadable member, wrong shape, non-finite values or values beyond
``--max-latent-magnitude``) are replaced by the
next valid sample in index order (a function of the data alone, so resume and every
layout still agree), counted in ``bad_samples`` and warned about; only when no valid
sample remains does reading fail, with an error naming the dataset. A shard that is
unreadable, truncated or empty when the loader starts gives no samples; it is counted in
``bad_shards`` and the samples its index recorded in ``bad_samples``.
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import os
import queue
import sys
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from .datasets import DEFAULT_MAX_LATENT_MAGNITUDE, LatentDataset, check_max_latent_magnitude, latent_problem

FORMAT = "rcm-megatron-shards/1"
META_FILE = "meta.json"
NEGATIVE_FILE = "negative_context.pth"
INDEX_SUFFIX = ".index.json"
LOADER_FORMAT = "rcm-megatron-shard-loader/1"
REQUIRED_MEMBERS = ("latents.pth", "context.pth")


class BadSample(ValueError):
    """A sample that cannot be used (unreadable, wrong shape, non-finite)."""


# ----------------------------------------------------------------------------- names and files
def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


def shard_complete(path: str) -> bool:
    """A shard is complete once its tar exists: the tar is renamed into place last."""
    return os.path.isfile(path)


def is_shard_spec(data: str | None) -> bool:
    """Whether ``--data`` names shards: a directory, a .tar file, or a brace pattern/list of them."""
    if not data or data == "synthetic":
        return False
    return os.path.isdir(data) or "{" in data or data.endswith(".tar") or ".tar," in data


def resolve_shards(spec) -> list[str]:
    """A directory (its ``*.tar``), a brace pattern ``dir/shard-{000000..000099}.tar``, a comma list or
    a list of paths -> the shard paths, sorted. Missing files of a pattern are reported; none is an error."""
    if isinstance(spec, (list, tuple)):
        urls = [str(u) for u in spec]
    elif os.path.isdir(spec):
        urls = glob.glob(os.path.join(spec, "*.tar"))
        if not urls:
            raise FileNotFoundError(f"--data {spec}: no *.tar shards in this directory")
    else:
        urls = []
        for part in str(spec).split(","):
            if "{" in part:
                try:
                    from braceexpand import braceexpand
                except ImportError as e:  # pragma: no cover - braceexpand is in the data extra
                    raise ImportError("brace patterns need braceexpand: pip install -e '.[data]'") from e
                urls.extend(braceexpand(part))
            elif part:
                urls.append(part)
    urls = sorted(set(urls))
    missing = [u for u in urls if not os.path.isfile(u)]
    present = [u for u in urls if os.path.isfile(u)]
    if not present:
        raise FileNotFoundError(f"--data {spec}: none of the {len(urls)} shard file(s) exists"
                                + (f" (first: {missing[0]})" if missing else ""))
    if missing:
        _warn(f"--data {spec}: {len(missing)} of {len(urls)} shards are missing (first: {missing[0]}); "
              f"using the {len(present)} present")
    return present


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tensor_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t.detach().cpu().contiguous().clone(), buf)  # clone: never save a view's whole storage
    return buf.getvalue()


def load_tensor(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- writing
def check_dataset_meta(root: str, meta: dict) -> None:
    """If ``root`` already holds a dataset, its shape-defining fields must equal ``meta``'s, so a
    resumed or extended run never mixes incompatible shards (every rank checks; rank 0 writes)."""
    path = os.path.join(root, META_FILE)
    if not os.path.isfile(path):
        return
    old = read_dataset_meta(root)
    for key in ("latent_shape", "text_len", "text_dim", "latent_dtype"):
        if key in old and key in meta and list(_listify(old[key])) != list(_listify(meta[key])):
            raise ValueError(f"{path}: existing dataset has {key}={old[key]}, this run would write "
                             f"{list(meta[key]) if isinstance(meta[key], tuple) else meta[key]}; "
                             "use another output directory")


def _listify(v):
    return v if isinstance(v, (list, tuple)) else [v]


def write_dataset_meta(root: str, meta: dict) -> dict:
    """Write ``meta.json`` (atomically) after ``check_dataset_meta``."""
    os.makedirs(root, exist_ok=True)
    meta = {"format": FORMAT, **meta}
    meta["latent_shape"] = [int(s) for s in meta["latent_shape"]]
    check_dataset_meta(root, meta)
    path = os.path.join(root, META_FILE)
    _atomic_write_bytes(path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return meta


def read_dataset_meta(root: str) -> dict:
    path = os.path.join(root, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; shards need a meta.json beside them "
                                "(written by tools/prepare_data.py or tools/synthesize_data.py)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def write_negative_context(root: str, context: torch.Tensor, prompt: str) -> None:
    os.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"context": context.detach().cpu().contiguous().clone(), "prompt": prompt}, buf)
    _atomic_write_bytes(os.path.join(root, NEGATIVE_FILE), buf.getvalue())


class ShardWriter:
    """One shard, written under a temporary name and committed atomically with its index.

    ``commit()`` closes the tar, records every member's (offset, size) in
    ``<shard>.index.json`` and renames the tar into place last, so a shard either exists
    complete or not at all (a resumed tool rewrites what is missing)::

        with ShardWriter(path) as w:
            w.write(key, latents, context, prompt, {"source": ...})
        # committed on a clean exit, discarded on an exception
    """

    def __init__(self, path: str, latent_dtype: torch.dtype = torch.bfloat16):
        import webdataset as wds

        self.path = path
        self.tmp = f"{path}.tmp.{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self.latent_dtype = latent_dtype
        self.count = 0

    def write(self, key: str, latents: torch.Tensor, context: torch.Tensor, prompt: str, meta: dict | None = None):
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if latents.dim() != 4 or context.dim() != 2:
            raise ValueError(f"expected latents [C,T,H,W] and context [L,D], got {tuple(latents.shape)}, "
                             f"{tuple(context.shape)}")
        self._tar.write({
            "__key__": key,
            "latents.pth": tensor_bytes(latents.to(self.latent_dtype)),
            "context.pth": tensor_bytes(context.to(self.latent_dtype)),
            "txt": prompt.encode("utf-8"),
            "json": json.dumps(meta or {}, sort_keys=True).encode("utf-8"),
        })
        self.count += 1

    def commit(self) -> int:
        self._tar.close()  # closes the tar stream; the file object stays ours
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index = scan_tar(self.tmp)
        side = {"format": FORMAT, "count": len(index), "size": os.path.getsize(self.tmp),
                "samples": [[k, m] for k, m in index]}
        _atomic_write_bytes(self.path + INDEX_SUFFIX, json.dumps(side, separators=(",", ":")).encode())
        os.replace(self.tmp, self.path)
        return len(index)

    def abort(self) -> None:
        try:
            try:
                self._tar.close()
            except Exception:
                pass
            self._file.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


# ----------------------------------------------------------------------------- reading
def scan_tar(path: str) -> list[tuple[str, dict[str, list[int]]]]:
    """[(key, {ext: [data offset, size]})] in file order, webdataset key convention
    (key = member path up to the first '.' of its base name)."""
    out: list[tuple[str, dict[str, list[int]]]] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            d, base = os.path.split(m.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = f"{d}/{stem}" if d else stem
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = [m.offset_data, m.size]
    return out


def read_shard_index(path: str) -> list[tuple[str, dict[str, list[int]]]]:
    """The shard's member table: from ``<shard>.index.json`` when it matches the tar, else by scanning."""
    side = path + INDEX_SUFFIX
    if os.path.isfile(side):
        try:
            with open(side) as f:
                idx = json.load(f)
            if idx.get("size") == os.path.getsize(path):
                return [(k, m) for k, m in idx["samples"]]
            _warn(f"{side}: stale (tar size changed); rescanning {path}")
        except (OSError, ValueError, KeyError) as e:
            _warn(f"{side}: unreadable ({e}); rescanning {path}")
    return scan_tar(path)


def _recorded_count(path: str) -> int:
    """The sample count the shard's index recorded when it was written (0 without a readable index)."""
    try:
        with open(path + INDEX_SUFFIX) as f:
            return int(json.load(f)["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _shard_count(path: str) -> tuple[int, int]:
    """(usable samples, samples lost) of one shard. An unreadable, truncated or empty shard is
    warned about and contributes no samples; the samples its index recorded are the ones lost."""
    side = path + INDEX_SUFFIX
    if os.path.isfile(side):
        try:
            with open(side) as f:
                idx = json.load(f)
            if idx.get("size") == os.path.getsize(path) and int(idx["count"]) > 0:
                return int(idx["count"]), 0
        except (OSError, ValueError, KeyError):
            pass
    try:
        count = len(read_shard_index(path))
    except (OSError, tarfile.TarError) as e:
        _warn(f"{path}: unreadable shard ({e}); skipping its samples")
        return 0, _recorded_count(path)
    if count == 0:
        _warn(f"{path}: empty shard (no samples); skipping it")
    return count, 0


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
        return {"latents": lat, "context": context, "prompt": prompt}

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
