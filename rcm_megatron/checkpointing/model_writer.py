"""Write any ``TensorSource`` as one of our model checkpoints (``tools/convert_checkpoint.py import``).

Writing is streamed: the sharded state dict handed to megatron-core holds meta-device
placeholders, and ``_StreamingSaveStrategy`` (``dist_io``'s in-process CPU strategy for
megatron-core's torch_dist format) materializes each tensor from the source only when its bytes
are written, then drops it. The commit is the trainer's (``save.CheckpointManager.commit``).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
import torch.distributed as dist

from ..models.config import WanConfig
from .dist_io import cpu_save_strategy, process_group
from .dist_source import MODEL_FORMAT, MODEL_FORMAT_VERSION, MODEL_PREFIX, inspect_checkpoint
from .errors import CheckpointError, ConversionError
from .layout import MARKER, iteration_dir
from .save import CheckpointManager
from .sources import TensorSource, full_shapes


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
    class _StreamingSaveStrategy(type(cpu_save_strategy())):
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
        CheckpointManager(root).commit(0)  # the trainer's atomic rename + marker protocol
    return final
