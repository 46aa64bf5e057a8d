"""Shard files: names, the dataset's meta.json and negative prompt, tensor (de)serialization and
the member index of a tar (the format is described in ``shards.py``)."""

from __future__ import annotations

import glob
import io
import json
import os
import sys
import tarfile

import torch

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
