"""Our distributed checkpoints as model sources and targets (megatron-core ``dist_checkpointing``).

Two kinds share the commit layout of ``training/checkpoint.py`` (``iter_NNNNNNN/`` +
``latest_checkpointed_iteration.txt``) and the common ``meta`` dict with ``model_config``:

- model checkpoints (``meta.format == "rcm-megatron-model"``), written by
  ``write_model_checkpoint`` (``tools/convert_checkpoint.py import``): one model, tensors
  keyed ``model.<our param name>``, stored whole (one chunk each). megatron-core reshards on
  load, so they load at any TP/CP/PP layout (``load_into_model``).
- training checkpoints (``"rcm-megatron-train"``, the trainer's ``--save``): ``student.*``,
  ``ema.*``, ``fake_score.*`` (plus optimizer state we never read here), written at any layout.

Writing is streamed: the sharded state dict handed to megatron-core holds meta-device
placeholders, and ``_StreamingSaveStrategy`` (``training/checkpoint.py``'s in-process CPU
strategy for megatron-core's torch_dist format) materializes each tensor from the source only
when its bytes are written, then drops it. Reading for export goes group by group
(one ``dist_checkpointing.load`` per group of tensors).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..models.config import WanConfig
from ..training.checkpoint import (MARKER, CheckpointError, CheckpointManager, checkpoint_path, iteration_dir,
                                   load_sharded, read_common)
from .readers import ConversionError, TensorInfo, TensorSource, full_shapes, mismatch_report

MODEL_FORMAT = "rcm-megatron-model"
TRAIN_FORMAT = "rcm-megatron-train"
MODEL_FORMAT_VERSION = 1
MODEL_PREFIX = "model"
WEIGHT_PREFIXES = ("model", "ema", "student", "fake_score")
DEFAULT_WEIGHTS_ORDER = ("ema", "model", "student")  # generation / teacher source default


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


def is_checkpoint_dir(path: str) -> bool:
    """A checkpoint root (with the commit marker) or one committed ``iter_NNNNNNN`` folder."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, MARKER)):
        return True
    return all(os.path.isfile(os.path.join(path, f)) for f in ("metadata.json", "common.pt"))


def resolve_checkpoint_dir(path: str, iteration: int | None = None) -> str:
    if iteration is None and all(os.path.isfile(os.path.join(path, f)) for f in ("metadata.json", "common.pt")):
        return path
    return checkpoint_path(path, iteration)


@dataclass
class CheckpointInfo:
    path: str  # the committed iter_NNNNNNN folder
    meta: dict
    config: WanConfig
    kind: str  # "model" or "train"
    tensors: dict  # prefix -> {our name -> TensorInfo (global shape, stored dtype)}

    @property
    def iteration(self) -> int:
        return int(self.meta.get("iteration", 0))

    @property
    def weights(self) -> list[str]:
        return [p for p in WEIGHT_PREFIXES if self.tensors.get(p)]


def inspect_checkpoint(path: str, iteration: int | None = None) -> CheckpointInfo:
    """Meta, architecture and tensor index of a checkpoint, without reading any tensor data."""
    from megatron.core import dist_checkpointing

    it_dir = resolve_checkpoint_dir(path, iteration)
    meta = read_common(it_dir).get("meta") or {}
    fmt = meta.get("format")
    if fmt not in (MODEL_FORMAT, TRAIN_FORMAT):
        raise CheckpointError(f"{it_dir}: not an rcm-megatron checkpoint (meta format {fmt!r}, expected "
                              f"{MODEL_FORMAT!r} or {TRAIN_FORMAT!r})")
    if "model_config" not in meta:
        raise CheckpointError(f"{it_dir}: the checkpoint's meta has no model_config")
    cfg = WanConfig.from_dict(meta["model_config"])
    try:
        metadata = dist_checkpointing.load_tensors_metadata(it_dir)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{it_dir}: cannot read the tensor index ({type(e).__name__}: {e})") from e
    tensors: dict[str, dict] = {}
    for key, sh in metadata.items():
        prefix, _, name = key.partition(".")
        if prefix in WEIGHT_PREFIXES:
            tensors.setdefault(prefix, {})[name] = TensorInfo(key, tuple(sh.global_shape), sh.dtype)
    return CheckpointInfo(it_dir, meta, cfg, "model" if fmt == MODEL_FORMAT else "train", tensors)


def choose_weights(info: CheckpointInfo, requested: str | None = None, order=DEFAULT_WEIGHTS_ORDER) -> str:
    available = info.weights
    if requested is None:
        for p in order:
            if p in available:
                return p
        raise ConversionError(f"{info.path}: holds no model weights (found {available})")
    if requested not in available:
        raise ConversionError(f"{info.path}: has no {requested!r} weights (a {info.kind} checkpoint holding "
                              f"{available})")
    return requested


def _replica_id() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CheckpointSource(TensorSource):
    """One model of our checkpoint, read in groups of whole tensors (every rank reads the same:
    in a multi-rank world all ranks must call ``read_many`` together)."""

    def __init__(self, path: str, weights: str | None = None, iteration: int | None = None):
        self.info = inspect_checkpoint(path, iteration)
        self.prefix = choose_weights(self.info, weights)
        self.config = self.info.config
        self.tensors = self.info.tensors[self.prefix]
        self.unexpected = []
        self.what = f"checkpoint {self.info.path} ({self.prefix} weights)"
        m = self.info.meta
        self.provenance = {"source": os.path.abspath(path), "format": f"{m.get('format')}",
                           "weights": self.prefix, "iteration": self.info.iteration}
        for k in ("mode", "method", "teacher"):
            if m.get(k) is not None:
                self.provenance[k] = m[k]
        if m.get("source") is not None:  # what an imported model was converted from
            self.provenance["converted_from"] = m["source"]

    def read_many(self, names) -> dict[str, torch.Tensor]:
        from megatron.core.dist_checkpointing import ShardedTensor

        names = list(names)
        template = {self.prefix: {n: ShardedTensor.from_rank_offsets(
            self.tensors[n].key, torch.empty(self.tensors[n].shape, dtype=self.tensors[n].dtype),
            replica_id=_replica_id()) for n in names}}
        with process_group():
            return load_sharded(self.info.path, template)[self.prefix]

    def read(self, name: str) -> torch.Tensor:
        return self.read_many([name])[name]


# ----------------------------------------------------------------------------- writing
class _MaterializedTensors:
    """A bucket's (write item, placeholder) list that yields each item with its real tensor, loaded
    only when the writer reaches it (and dropped by the writer right after)."""

    def __init__(self, items, loader):
        self.items, self.loader = items, loader

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        for item, placeholder in self.items:
            tensor = self.loader(item.index.fqn)
            if tuple(tensor.shape) != tuple(placeholder.shape):
                raise ConversionError(f"{item.index.fqn}: source tensor has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(placeholder.shape)}")
            yield item, tensor.to("cpu", placeholder.dtype).contiguous()


def _streaming_strategy(loader):
    """The trainer's in-process CPU save strategy (megatron-core torch_dist), with every bucket's
    tensors materialized from ``loader(key)`` as they are written: the state dict holds meta tensors."""
    from ..training.checkpoint import _CPUSaveStrategy

    class _StreamingSaveStrategy(type(_CPUSaveStrategy())):
        def async_save(self, sharded_state_dict, checkpoint_dir):
            request = super().async_save(sharded_state_dict, checkpoint_dir)
            if request.async_fn is not None:
                buckets = request.async_fn_args[1]
                for i, (file_name, storage_key, (bytes_data, tensor_data)) in enumerate(buckets):
                    buckets[i] = (file_name, storage_key, (bytes_data, _MaterializedTensors(tensor_data, loader)))
            return request

    return _StreamingSaveStrategy("torch_dist", 1, thread_count=1)


def model_checkpoint_meta(cfg: WanConfig, provenance: dict, dtype: torch.dtype | None) -> dict:
    return {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "iteration": 0,
            "model_config": cfg.to_dict(), "weights": [MODEL_PREFIX], "source": provenance,
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else "as-source"}


def write_model_checkpoint(root: str, source: TensorSource, dtype: torch.dtype | None = torch.float32,
                           overwrite: bool = False, progress=None) -> str:
    """Stream ``source`` into a committed model checkpoint under ``root`` (iteration 0); returns its folder.

    ``dtype`` None keeps each tensor's stored dtype. One process: megatron-core reshards on load.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    source.check()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("write_model_checkpoint runs on one process (the result loads at any layout)")
    if os.path.isfile(os.path.join(root, MARKER)):
        info = None
        with contextlib.suppress(CheckpointError, ValueError, OSError):
            info = inspect_checkpoint(root)
        if info is None or info.kind != "model":
            raise ConversionError(f"{root} already holds a checkpoint that is not a converted model "
                                  "(a training run's --save?); choose another directory")
        if not overwrite:
            raise ConversionError(f"{root} already holds a converted model checkpoint; pass --overwrite to replace it")
    shapes = full_shapes(source.config)
    placeholders = {}
    for name, shape in shapes.items():
        dt = dtype or source.tensors[name].dtype
        placeholders[name] = ShardedTensor.from_rank_offsets(f"{MODEL_PREFIX}.{name}",
                                                             torch.empty(shape, dtype=dt, device="meta"), replica_id=0)
    done = [0]

    def loader(key: str) -> torch.Tensor:
        t = source.read(key[len(MODEL_PREFIX) + 1:])
        done[0] += 1
        if progress is not None:
            progress(done[0], len(placeholders), key)
        return t

    state = {"meta": model_checkpoint_meta(source.config, source.provenance, dtype), MODEL_PREFIX: placeholders}
    final = iteration_dir(root, 0)
    tmp = final + ".tmp"
    with process_group():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        dist_checkpointing.save(state, tmp, sharded_strategy=_streaming_strategy(loader))
        CheckpointManager(root)._commit(0)  # the trainer's atomic rename + marker protocol
    return final


# ----------------------------------------------------------------------------- loading into a model
def load_into_model(model, source: "CheckpointSource") -> None:
    """Load one model of our checkpoint into ``model`` at the current TP/PP layout (each rank
    reads only its shards; a collective over all ranks)."""
    from ..training import sharded_state as ss

    found = {n: i.shape for n, i in source.tensors.items()}
    msg = mismatch_report(source.what, full_shapes(model.config), found)
    if msg:
        raise ConversionError(msg)
    with process_group():
        loaded = load_sharded(source.info.path, {source.prefix: ss.model_sharded_state_dict(model, source.prefix)})
    ss.copy_loaded_into_model(model, loaded[source.prefix])
