"""Our distributed checkpoints as model sources (megatron-core ``dist_checkpointing``).

Two kinds share the commit layout of ``layout.py`` (``iter_NNNNNNN/`` +
``latest_checkpointed_iteration.txt``) and the common ``meta`` dict with ``model_config``:

- model checkpoints (``meta.format == "rcm-megatron-model"``), written by
  ``write_model_checkpoint`` (``tools/convert_checkpoint.py import``): one model, tensors
  keyed ``model.<our param name>``, stored whole (one chunk each). megatron-core reshards on
  load, so they load at any TP/CP/PP layout (``load_into_model``).
- training checkpoints (``"rcm-megatron-train"``, the trainer's ``--save``): ``student.*``,
  ``ema.*``, ``fake_score.*`` (plus optimizer state we never read here), written at any layout.

Reading for export goes group by group (one ``dist_checkpointing.load`` per group of tensors);
``load_into_model`` reads only this rank's shards at the current layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..models.config import WanConfig
from . import sharded_state as ss
from .checksums import verify_folder
from .dist_io import READ_ERRORS, load_sharded, process_group, read_common
from .errors import CheckpointError, ConversionError
from .layout import resolve_checkpoint_dir
from .sources import TensorInfo, TensorSource, full_shapes, mismatch_report

MODEL_FORMAT = "rcm-megatron-model"
TRAIN_FORMAT = "rcm-megatron-train"
MODEL_FORMAT_VERSION = 1
MODEL_PREFIX = "model"
WEIGHT_PREFIXES = ("model", "ema", "student", "fake_score")
DEFAULT_WEIGHTS_ORDER = ("ema", "model", "student")  # generation / teacher source default
TRAIN_WEIGHTS = ("ema", "student", "fake_score")  # the models of a training checkpoint


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
    verify_folder(it_dir, metadata_only=True)  # sizes of all files, checksums of all but the shards
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
    except READ_ERRORS as e:  # noqa: BLE001
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
        verify_folder(self.info.path, _replica_id(), dist.get_world_size() if dist.is_initialized() else 1)
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


# ----------------------------------------------------------------------------- loading into a model
def load_into_model(model, source: "CheckpointSource") -> None:
    """Load one model of our checkpoint into ``model`` at the current TP/PP layout (each rank
    reads only its shards; a collective over all ranks)."""
    found = {n: i.shape for n, i in source.tensors.items()}
    msg = mismatch_report(source.what, full_shapes(model.config), found)
    if msg:
        raise ConversionError(msg)
    with process_group():
        loaded = load_sharded(source.info.path, {source.prefix: ss.model_sharded_state_dict(model, source.prefix)})
    ss.copy_loaded_into_model(model, loaded[source.prefix])
