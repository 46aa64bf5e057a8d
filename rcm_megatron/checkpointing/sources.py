"""Model weights read one tensor at a time, in our names: the interface every reader implements.

A ``TensorSource`` knows the architecture (``config``), where each of our parameters lives
(``tensors``: our name -> TensorInfo with the name in the file, shape and dtype, all read from
file headers without touching the data) and reads tensors on demand, so nothing holds more than
the tensors asked for. ``check()`` compares a source with the architecture it claims and raises
one ``ConversionError`` listing every missing key, unexpected key and shape mismatch.

The readers: ``readers`` (diffusers folders, original Wan2.1 checkpoints), ``dist_source``
(our dist_checkpointing folders), ``StateDictSource`` here (our model files, in-memory models);
``loading.open_source`` picks the right one for a path.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from ..models.config import WanConfig
from .errors import ConversionError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class TensorInfo:
    key: str  # the name in the source
    shape: tuple
    dtype: torch.dtype
    file: str | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * self.dtype.itemsize


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'fp32' / 'bf16' / 'fp16' (or torch spellings) -> dtype; None / 'keep' -> None."""
    if name is None or name == "keep":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)} or 'keep'")
    return DTYPES[name]


def parse_size(text) -> int:
    """'5GB' / '500MB' / '2GiB' / bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def full_shapes(cfg: WanConfig) -> dict[str, tuple]:
    """Our parameter names -> full (unsharded) shapes, from a model built on the meta device."""
    from ..models.wan import WanDiT
    from ..parallel import state

    tp = state.tensor_parallel_world_size()
    with torch.device("meta"):
        model = WanDiT(cfg)
    out = {}
    for name, p in model.named_parameters():
        shape = list(p.shape)
        split = getattr(p, "tp_split_dim", None)
        if split is not None:
            shape[split] *= tp
        out[name] = tuple(shape)
    return out


def _compress(names) -> list[str]:
    """Group names that differ only in their block index: blocks.{0-3,7}.attn1.to_q.weight."""
    groups: dict[str, list[int]] = {}
    singles = []
    for n in sorted(names):
        m = re.match(r"^(.*?blocks\.)(\d+)(\..*)$", n)
        if m:
            groups.setdefault(f"{m.group(1)}{{}}{m.group(3)}", []).append(int(m.group(2)))
        else:
            singles.append(n)
    out = list(singles)
    for pattern, idx in sorted(groups.items()):
        idx = sorted(set(idx))
        if len(idx) == 1:
            out.append(pattern.replace("{}", str(idx[0])))
            continue
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out.append(pattern.replace("{}", "{" + ",".join(runs) + "}"))
    return out


def mismatch_report(what: str, expected: dict[str, tuple], found: dict[str, tuple], unexpected=()) -> str | None:
    """One message naming every missing / unexpected key and every shape mismatch (None: all fine)."""
    missing = sorted(set(expected) - set(found))
    shape_errors = [f"{n}: {tuple(found[n])} (expected {tuple(expected[n])})"
                    for n in sorted(set(expected) & set(found)) if tuple(found[n]) != tuple(expected[n])]
    unexpected = sorted(set(unexpected) | (set(found) - set(expected)))
    if not (missing or shape_errors or unexpected):
        return None
    parts = [f"{what} does not match the architecture"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_compress(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_compress(unexpected)}")
    if shape_errors:
        parts.append(f"shape mismatches ({len(shape_errors)}): {shape_errors[:20]}"
                     + (f" ... and {len(shape_errors) - 20} more" if len(shape_errors) > 20 else ""))
    return "; ".join(parts)


class TensorSource:
    """Base class: ``config``, ``provenance``, ``tensors`` (our name -> TensorInfo), ``unexpected``."""

    config: WanConfig
    provenance: dict
    tensors: dict[str, TensorInfo]
    unexpected: list[str]
    what: str = "source"

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_many(self, names) -> dict[str, torch.Tensor]:
        return {n: self.read(n) for n in names}

    def check(self) -> None:
        expected = full_shapes(self.config)
        msg = mismatch_report(self.what, expected, {n: i.shape for n, i in self.tensors.items()}, self.unexpected)
        if msg:
            raise ConversionError(msg)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such config file")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path}: not valid JSON ({e})") from e


class StateDictSource(TensorSource):
    """An in-memory state dict in our names (a model file, a diffusers model instance)."""

    def __init__(self, config: WanConfig, state_dict: dict, provenance: dict, what: str = "state dict"):
        self.config, self.provenance, self.what = config, provenance, what
        self._sd = state_dict
        self.tensors = {n: TensorInfo(n, tuple(t.shape), t.dtype) for n, t in state_dict.items()}
        self.unexpected = []

    def read(self, name: str) -> torch.Tensor:
        return self._sd[name]
