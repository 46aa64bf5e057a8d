"""Readers for the formats people hand us: diffusers folders and original Wan2.1 checkpoints.

File mappings are dropped and reopened after ``READ_BUDGET_BYTES`` of reads, so converting a
14B model stays at roughly one tensor (plus that budget) of memory.

- ``DiffusersSource``: a diffusers ``WanTransformer3DModel`` folder (config.json plus one
  safetensors file or shards with an index), or a pipeline folder (its ``transformer/``).
- ``WanOriginalSource``: the original Wan2.1 layout (``convert/wan_original.py``): a ``.pth``/``.pt``
  file, a single-file ``.safetensors``, or the official release folder (config.json with
  ``_class_name: WanModel`` and safetensors shards).
"""

from __future__ import annotations

import json
import os

import torch

from ..convert.diffusers_wan import NAME_MAP, _map_name, config_from_diffusers
from ..convert.wan_original import (config_from_wan_original, infer_config_from_shapes, original_to_diffusers_name,
                                    strip_prefix, unsupported_variant)
from ..models.config import WanConfig
from .errors import ConversionError
from .layout import MARKER
from .sources import TensorInfo, TensorSource

READ_BUDGET_BYTES = 1 << 30  # drop a file mapping after this many bytes were read through it

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"



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
        if os.path.isfile(os.path.join(path, MARKER)) or os.path.isfile(os.path.join(path, "metadata.json")):
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
            raise ConversionError(f"{path}: {variant} is not supported; expected a Wan DiT: Wan2.1 T2V or I2V, "
                                  "Wan2.2 TI2V or one Wan2.2 A14B expert")
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


