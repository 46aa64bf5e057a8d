"""Model weights read one tensor at a time, in our names, from the formats people hand us.

A ``TensorSource`` knows the architecture (``config``), where each of our parameters lives
(``tensors``: our name -> TensorInfo with the name in the file, shape and dtype, all read from
file headers without touching the data) and reads tensors on demand. Nothing holds more than
the tensors asked for; file mappings are dropped and reopened after ``READ_BUDGET_BYTES`` of
reads, so converting a 14B model stays at roughly one tensor (plus that budget) of memory.

- ``DiffusersSource``: a diffusers ``WanTransformer3DModel`` folder (config.json plus one
  safetensors file or shards with an index), or a pipeline folder (its ``transformer/``).
- ``WanOriginalSource``: the original Wan2.1 layout (``wan_original.py``): a ``.pth``/``.pt``
  file, a single-file ``.safetensors``, or the official release folder (config.json with
  ``_class_name: WanModel`` and safetensors shards).
- our distributed checkpoints: ``checkpoints.CheckpointSource``; ``loading.open_source``
  picks the right one for a path.

``check()`` compares a source with the architecture it claims and raises one
``ConversionError`` listing every missing key, unexpected key and shape mismatch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from ..models.config import WanConfig
from .diffusers_wan import NAME_MAP, _map_name, config_from_diffusers
from .wan_original import (config_from_wan_original, infer_config_from_shapes, original_to_diffusers_name,
                           strip_prefix, unsupported_variant)

READ_BUDGET_BYTES = 1 << 30  # drop a file mapping after this many bytes were read through it

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"


class ConversionError(ValueError):
    """Input that does not match what it should be: names the file and every problem."""


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


class _SafetensorsFiles:
    """Reads tensors from safetensors files through one open mapping at a time, dropped when another
    file is read or after READ_BUDGET_BYTES (the pages read through a mapping count as resident)."""

    def __init__(self):
        self._file, self._handle, self._read = None, None, 0

    @staticmethod
    def header(path: str) -> dict[str, TensorInfo]:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                out = {}
                for k in f.keys():
                    s = f.get_slice(k)
                    dt = s.get_dtype()
                    if dt not in SAFETENSORS_DTYPES:
                        raise ConversionError(f"{path}: tensor {k} has unsupported dtype {dt}")
                    out[k] = TensorInfo(k, tuple(s.get_shape()), SAFETENSORS_DTYPES[dt], path)
                return out
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
            raise ConversionError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from e

    def read(self, info: TensorInfo) -> torch.Tensor:
        from safetensors import safe_open

        if self._file != info.file or self._read >= READ_BUDGET_BYTES:
            self.close()
            self._file, self._handle, self._read = info.file, safe_open(info.file, framework="pt"), 0
        t = self._handle.get_tensor(info.key)
        self._read += info.nbytes
        return t

    def close(self):
        self._file, self._handle, self._read = None, None, 0


class DiffusersSource(TensorSource):
    """A diffusers WanTransformer3DModel folder (or a pipeline folder with transformer/)."""

    what = "diffusers WanTransformer3DModel"

    def __init__(self, path: str):
        folder = diffusers_folder(path)
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        self.config = config_from_diffusers(cfg)
        self.folder, self.what = folder, f"diffusers folder {folder}"
        self.provenance = {"source": os.path.abspath(folder), "format": "diffusers",
                           "diffusers_version": cfg.get("_diffusers_version")}
        self._files = _SafetensorsFiles()
        self.tensors, self.unexpected = {}, []
        for fn in safetensors_files(folder):
            for key, info in _SafetensorsFiles.header(fn).items():
                if key.endswith("norm_added_q.weight"):  # diffusers ignores it on load too
                    continue
                ours = _map_name(key, NAME_MAP)
                if ours is None:
                    self.unexpected.append(key)
                else:
                    self.tensors[ours] = info

    def read(self, name: str) -> torch.Tensor:
        return self._files.read(self.tensors[name])

    def close(self):
        self._files.close()


def diffusers_folder(path: str) -> str:
    """The transformer folder of ``path`` (itself, or ``transformer/`` of a pipeline); checks its class."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such directory (expected a diffusers WanTransformer3DModel folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "transformer", "config.json")):
            return diffusers_folder(os.path.join(path, "transformer"))
        if os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")) or os.path.isfile(
                os.path.join(path, "metadata.json")):
            raise ConversionError(f"{path} is an rcm-megatron checkpoint, not a diffusers folder (export it with "
                                  "tools/convert_checkpoint.py export, or use it directly)")
        raise ConversionError(f"{path} is not a diffusers model folder: no config.json (nor transformer/config.json)")
    with open(os.path.join(path, "config.json")) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path}/config.json: not valid JSON ({e})") from e
    cls = cfg.get("_class_name")
    if cls == "WanModel":
        raise ConversionError(f"{path} holds an original Wan2.1 checkpoint (_class_name WanModel), not a diffusers "
                              "folder: use --wan-pth for it")
    if cls not in (None, "WanTransformer3DModel"):
        raise ConversionError(f"{path}: config.json is for {cls}, expected a WanTransformer3DModel (the transformer/ "
                              "folder of a Wan2.1 diffusers pipeline)")
    return path


def safetensors_files(folder: str, index_name: str = DIFFUSERS_INDEX, single_name: str = DIFFUSERS_SINGLE) -> list[str]:
    index, single = os.path.join(folder, index_name), os.path.join(folder, single_name)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [fn for fn in files if not os.path.isfile(os.path.join(folder, fn))]
        if missing:
            raise ConversionError(f"{index} names shard files that are missing: {missing}")
        return [os.path.join(folder, fn) for fn in files]
    if os.path.isfile(single):
        return [single]
    raise ConversionError(f"{folder}: no {single_name} or {index_name}")


# ----------------------------------------------------------------------------- original Wan
class _TorchFile:
    """A torch zip checkpoint opened with mmap; reopened after READ_BUDGET_BYTES of reads."""

    def __init__(self, path: str):
        self.path, self._sd, self._read = path, None, 0

    def state_dict(self) -> dict:
        if self._sd is None:
            try:
                blob = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001
                raise ConversionError(f"{self.path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from e
            self._sd = _unwrap_state_dict(blob, self.path)
        return self._sd

    def read(self, key: str) -> torch.Tensor:
        t = self.state_dict()[key].clone()
        self._read += t.nbytes
        if self._read >= READ_BUDGET_BYTES:
            self._sd, self._read = None, 0
        return t

    def close(self):
        self._sd = None


def _unwrap_state_dict(blob, path: str) -> dict:
    if isinstance(blob, dict) and not any(isinstance(v, torch.Tensor) for v in blob.values()):
        for key in ("state_dict", "model", "module", "ema"):
            if isinstance(blob.get(key), dict):
                return _unwrap_state_dict(blob[key], path)
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ConversionError(f"{path}: not a state dict of tensors (top-level keys {list(blob)[:8] if isinstance(blob, dict) else type(blob).__name__})")
    return blob


class WanOriginalSource(TensorSource):
    """Original Wan2.1 layout: a .pth/.pt file, a .safetensors file or the release folder."""

    def __init__(self, path: str, config: WanConfig | dict | None = None, num_heads: int | None = None):
        self.path, self.what = path, f"original Wan2.1 checkpoint {path}"
        self._files, self._torch = _SafetensorsFiles(), None
        raw: dict[str, TensorInfo] = {}
        cfg_dict = None
        if os.path.isdir(path):
            cfg_path = os.path.join(path, "config.json")
            if os.path.isfile(cfg_path):
                with open(cfg_path) as f:
                    cfg_dict = json.load(f)
                if cfg_dict.get("_class_name") not in (None, "WanModel"):
                    raise ConversionError(f"{path}: config.json is for {cfg_dict.get('_class_name')}, expected the "
                                          "original WanModel (for a diffusers folder use --hf-dir)")
            try:
                files = safetensors_files(path)
            except ConversionError:
                pths = sorted(fn for fn in os.listdir(path) if fn.endswith((".pth", ".pt")))
                if len(pths) != 1:
                    raise ConversionError(f"{path}: expected diffusion_pytorch_model*.safetensors or exactly one .pth "
                                          f"file, found {pths or 'neither'}") from None
                files = [os.path.join(path, pths[0])]
        elif os.path.isfile(path):
            files = [path]
        else:
            raise ConversionError(f"{path}: no such file or directory")
        for fn in files:
            if fn.endswith(".safetensors"):
                raw.update(_SafetensorsFiles.header(fn))
            else:
                self._torch = _TorchFile(fn)
                for k, t in self._torch.state_dict().items():
                    raw[k] = TensorInfo(k, tuple(t.shape), t.dtype, fn)
                self._torch.close()
        variant = unsupported_variant(raw)
        if variant:
            raise ConversionError(f"{path}: {variant} is not supported; expected a Wan2.1 text-to-video DiT")
        stripped = {strip_prefix(k): i for k, i in raw.items()}
        if isinstance(config, WanConfig):
            self.config = config
        elif config is not None:
            self.config = _config_from_any(config, path)
        elif cfg_dict is not None:
            self.config = config_from_wan_original(cfg_dict, {k: i.shape for k, i in stripped.items()})
        else:
            self.config = infer_config_from_shapes({k: i.shape for k, i in stripped.items()}, num_heads)
        self.tensors, self.unexpected = {}, []
        for key, info in stripped.items():
            dn = original_to_diffusers_name(key)
            ours = _map_name(dn, NAME_MAP) if dn is not None else None
            if ours is None:
                self.unexpected.append(info.key)
            else:
                self.tensors[ours] = info
        self.provenance = {"source": os.path.abspath(path), "format": "wan-original"}

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file is not None and info.file.endswith(".safetensors"):
            return self._files.read(info)
        return self._torch.read(info.key)

    def close(self):
        self._files.close()
        if self._torch is not None:
            self._torch.close()


def _config_from_any(cfg: dict, where: str) -> WanConfig:
    """A config dict in any of the three spellings: ours, diffusers', original Wan's."""
    if cfg.get("_class_name") == "WanModel" or "dim" in cfg:
        return config_from_wan_original(cfg)
    if cfg.get("_class_name") == "WanTransformer3DModel" or "attention_head_dim" in cfg:
        return config_from_diffusers(cfg)
    try:
        return WanConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: config is neither a WanConfig, a diffusers nor an original Wan config: {e}") from e


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
