"""Write any ``TensorSource`` as a diffusers ``WanTransformer3DModel`` folder, shard by shard.

Output: ``config.json`` (``diffusers_wan.diffusers_config``) and safetensors weights in
diffusers' names - one ``diffusion_pytorch_model.safetensors``, or above ``max_shard_bytes``
``diffusion_pytorch_model-0000K-of-0000N.safetensors`` with
``diffusion_pytorch_model.safetensors.index.json`` (what ``save_pretrained`` writes and
``from_pretrained`` reads). Tensors are read one output shard at a time, so memory is about
one shard. The folder is written under a temporary name and renamed when complete.

With ``dtype=bfloat16`` the modules diffusers keeps in fp32
(``WanTransformer3DModel._keep_in_fp32_modules``: time embedder, modulation tables, norms)
stay fp32, as ``from_pretrained(torch_dtype=torch.bfloat16)`` would hold them anyway.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..convert.diffusers_wan import REVERSE_MAP, _map_name, diffusers_config
from .readers import DIFFUSERS_INDEX, DIFFUSERS_SINGLE
from .sources import TensorSource, full_shapes

DEFAULT_MAX_SHARD = 5 * 10**9  # diffusers' save_pretrained default ("5GB")
KEEP_IN_FP32_FALLBACK = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def _keep_in_fp32_modules() -> tuple[str, ...]:
    try:
        from diffusers import WanTransformer3DModel

        return tuple(WanTransformer3DModel._keep_in_fp32_modules or ())
    except Exception:  # noqa: BLE001 - diffusers is optional for exporting
        return KEEP_IN_FP32_FALLBACK


def output_dtype(diffusers_name: str, dtype: torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    if dtype is None:
        return stored
    if dtype in (torch.bfloat16, torch.float16) and any(m in diffusers_name.split(".") for m in _keep_in_fp32_modules()):
        return torch.float32
    return dtype


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard when the next tensor would overflow (a lone big tensor gets its own)."""
    shards, cur, cur_bytes = [], [], 0
    for name, n in sizes:
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def export_diffusers(source: TensorSource, out_dir: str, dtype: torch.dtype | None = torch.float32,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD, overwrite: bool = False, progress=None) -> dict:
    """Write ``source`` to ``out_dir``; returns a summary (files, bytes, number of tensors)."""
    from safetensors.torch import save_file

    from ..cli import follow_umask

    source.check()
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    names = list(full_shapes(source.config))  # model order: embeddings, blocks, head
    dnames = {n: _map_name(n, REVERSE_MAP) for n in names}
    dtypes = {n: output_dtype(dnames[n], dtype, source.tensors[n].dtype) for n in names}
    sizes = [(n, source.tensors[n].nbytes // source.tensors[n].dtype.itemsize * dtypes[n].itemsize) for n in names]
    shards = plan_shards(sizes, max_shard_bytes)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map, total = {}, 0
    files = [DIFFUSERS_SINGLE] if len(shards) == 1 else [
        f"diffusion_pytorch_model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for k, (shard, fn) in enumerate(zip(shards, files)):
        tensors = source.read_many(shard)
        out = {}
        for n in shard:
            t = tensors.pop(n)
            out[dnames[n]] = t.detach().to("cpu", dtypes[n]).contiguous()
            weight_map[dnames[n]] = fn
            total += out[dnames[n]].nbytes
            del t
        save_file(out, os.path.join(tmp, fn), metadata={"format": "pt"})
        follow_umask(os.path.join(tmp, fn))  # safetensors writes 0600
        del out, tensors
        if progress is not None:
            progress(k + 1, len(shards), fn)
    if len(shards) > 1:
        with open(os.path.join(tmp, DIFFUSERS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    cfg = diffusers_config(source.config)
    try:
        import diffusers

        cfg["_diffusers_version"] = diffusers.__version__
    except ImportError:
        pass
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(tmp, "rcm_megatron_provenance.json"), "w") as f:
        json.dump(_jsonable(source.provenance), f, indent=2)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return {"files": files, "bytes": total, "tensors": len(names)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
