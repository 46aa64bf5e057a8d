"""Writing one shard of training samples (the format is described in ``shards.py``)."""

from __future__ import annotations

import json
import os

import torch

from .conditions import FIELDS
from .shard_files import FORMAT, INDEX_SUFFIX, _atomic_write_bytes, scan_tar, tensor_bytes


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

    def write(self, key: str, latents: torch.Tensor, context: torch.Tensor, prompt: str, meta: dict | None = None,
              conditions: dict[str, torch.Tensor] | None = None):
        """``conditions``: image-to-video fields (``conditions.FIELDS``: first_frame, condition,
        image_embeds), stored as ``KEY.<field>.pth`` in the latent dtype."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if latents.dim() != 4 or context.dim() != 2:
            raise ValueError(f"expected latents [C,T,H,W] and context [L,D], got {tuple(latents.shape)}, "
                             f"{tuple(context.shape)}")
        unknown = sorted(set(conditions or {}) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown condition field(s) {unknown}; expected some of {list(FIELDS)}")
        self._tar.write({
            "__key__": key,
            "latents.pth": tensor_bytes(latents.to(self.latent_dtype)),
            "context.pth": tensor_bytes(context.to(self.latent_dtype)),
            **{f"{name}.pth": tensor_bytes(t.to(self.latent_dtype)) for name, t in (conditions or {}).items()},
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
