"""Latent datasets.

rCM distillation needs only pre-encoded latents [C, T, H, W], the prompt's text embedding
[L, text_dim] and one negative-prompt embedding for CFG. Two sources here: built-in
synthetic data (procedural, nothing downloaded, for the embedded default and tests) and a
single tensor file. Sharded webdataset input lives in its own module.
"""

from __future__ import annotations

import math
import os
import sys

import torch

# Latents are normalized to about unit variance (the VAE's per-channel mean/std, or the synthetic and
# toy generators' own scaling), so a value beyond this is a corrupt or unnormalized sample, not data.
DEFAULT_MAX_LATENT_MAGNITUDE = 1e4


def check_max_latent_magnitude(value: float) -> float:
    """``--max-latent-magnitude``: a positive finite bound (a latent value beyond it makes a bad sample)."""
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--max-latent-magnitude {value}: expected a positive finite number "
                         f"(default {DEFAULT_MAX_LATENT_MAGNITUDE:g}: latents have about unit variance)")
    return value


def latent_problem(latents: torch.Tensor, context: torch.Tensor, max_magnitude: float) -> str | None:
    """Why a sample cannot be trained on (non-finite values, or latents beyond ``max_magnitude``), or None."""
    if not (torch.isfinite(latents).all() and torch.isfinite(context).all()):
        return "non-finite values"
    peak = float(latents.abs().max()) if latents.numel() else 0.0
    if peak > max_magnitude:
        return f"latent magnitude {peak:.3g} beyond --max-latent-magnitude {max_magnitude:g}"
    return None


class LatentDataset:
    """Interface: len, item i -> {"latents", "context"}, and the negative-prompt embedding.
    Image-to-video data also hold the fields named in ``conditions`` (``conditions.py``)."""

    conditions: tuple[str, ...] = ()

    latent_shape: tuple[int, int, int, int]
    text_len: int
    text_dim: int
    negative_context: torch.Tensor

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def batch(self, indices) -> dict:
        items = [self[int(i)] for i in indices]
        return {
            "latents": torch.stack([it["latents"] for it in items]),
            "context": torch.stack([it["context"] for it in items]),
            "index": torch.as_tensor([int(i) for i in indices], dtype=torch.long),
        }


class SyntheticLatents(LatentDataset):
    """Procedural latent videos: a few drifting low-frequency waves per sample, one of
    ``num_prompts`` prompt embeddings per sample. Deterministic in (seed, index)."""

    def __init__(self, latent_shape=(16, 3, 8, 8), text_len: int = 8, text_dim: int = 64, num_samples: int = 4096,
                 num_prompts: int = 8, seed: int = 1234):
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.text_len, self.text_dim = int(text_len), int(text_dim)
        self.num_samples, self.num_prompts, self.seed = int(num_samples), int(num_prompts), int(seed)
        g = torch.Generator().manual_seed(seed)
        self.prompts = torch.randn(num_prompts, text_len, text_dim, generator=g)
        self.negative_context = torch.randn(text_len, text_dim, generator=g) * 0.5
        self.prompt_waves = torch.randn(num_prompts, 3, generator=g)  # a prompt sets the drift direction

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside 0..{self.num_samples - 1}")
        c, t, h, w = self.latent_shape
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        p = i % self.num_prompts
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        vel = self.prompt_waves[p]
        x = torch.zeros(c, t, h, w)
        for _ in range(3):
            kx, ky = torch.randint(1, 3, (2,), generator=g).tolist()
            amp = torch.randn(c, 1, 1, 1, generator=g)
            phase = torch.rand(1, generator=g).item() * 2 * math.pi
            arg = (2 * math.pi * (kx * (ww + vel[1] * tt) / w + ky * (hh + vel[2] * tt) / h) + phase)
            x += amp * torch.sin(arg)[None]
        x = x / x.std().clamp_min(1e-6)
        return {"latents": x, "context": self.prompts[p].clone()}


class TensorFileLatents(LatentDataset):
    """A ``.pt`` file holding {"latents": [N,C,T,H,W], "context": [N,L,D], "negative_context": [L,D]}.

    Samples with non-finite values or latents beyond ``max_latent_magnitude`` are dropped when the
    file is read, warned about and counted in ``bad_samples``."""

    EXPECTED = "a latent file: a torch.save'd dict {latents [N,C,T,H,W], context [N,L,D], negative_context [L,D]}"

    def __init__(self, path: str, max_latent_magnitude: float = DEFAULT_MAX_LATENT_MAGNITUDE):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: no such file")
        bound = check_max_latent_magnitude(max_latent_magnitude)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch/pickle raise KeyError, UnpicklingError, RuntimeError... on garbage
            raise ValueError(f"--data {path}: not readable as {self.EXPECTED} "
                             f"(torch.load: {type(e).__name__})") from None
        if not isinstance(blob, dict):
            raise ValueError(f"--data {path}: holds a {type(blob).__name__}; expected {self.EXPECTED}")
        for key in ("latents", "context", "negative_context"):
            if not isinstance(blob.get(key), torch.Tensor):
                raise ValueError(f"--data {path}: missing key {key!r}; expected latents, context, negative_context")
        lat, ctx, neg = blob["latents"], blob["context"], blob["negative_context"]
        if lat.dim() != 5 or ctx.dim() != 3 or neg.dim() != 2 or lat.shape[0] != ctx.shape[0] or ctx.shape[2] != neg.shape[1]:
            raise ValueError(f"--data {path}: expected latents [N,C,T,H,W], context [N,L,D], negative_context [L,D]; "
                             f"got {tuple(lat.shape)}, {tuple(ctx.shape)}, {tuple(neg.shape)}")
        lat, ctx = lat.float(), ctx.float()
        problems = [latent_problem(lat[i], ctx[i], bound) for i in range(lat.shape[0])]
        keep = [i for i, p in enumerate(problems) if p is None]
        self.bad_samples = lat.shape[0] - len(keep)
        if not keep:
            raise ValueError(f"--data {path}: none of its {lat.shape[0]} samples is usable (first: {problems[0]})")
        if self.bad_samples:
            first = next(i for i, p in enumerate(problems) if p)
            print(f"warning: --data {path}: skipping {self.bad_samples} bad sample(s) of {lat.shape[0]} "
                  f"(first, sample {first}: {problems[first]})", file=sys.stderr, flush=True)
        self.latents, self.context, self.negative_context = lat[keep], ctx[keep], neg.float()
        self.latent_shape = tuple(lat.shape[1:])
        self.text_len, self.text_dim = ctx.shape[1], ctx.shape[2]

    def __len__(self):
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "context": self.context[i]}


def build_dataset(data: str | None, in_channels: int, text_dim: int, latent_shape=None, seed: int = 1234,
                  max_latent_magnitude: float = DEFAULT_MAX_LATENT_MAGNITUDE):
    """``data`` None or "synthetic" -> SyntheticLatents matching the model; "toy" -> the toy video
    task (data/toy.py, fixed shape); "toy-i2v" -> the same with its first frame given (toy_i2v.py);
    otherwise a tensor file. ``in_channels``: the latent channels (a model's out_channels)."""
    if data in ("toy", "toy-i2v"):  # the built-in toy task with measurable quality (issue 10), or its I2V form
        from .toy import ToyVideoLatents
        from .toy_i2v import ToyI2VLatents

        ds = (ToyI2VLatents if data == "toy-i2v" else ToyVideoLatents)(seed=seed)
        if latent_shape and tuple(latent_shape) != ds.latent_shape:
            raise ValueError(f"--latent-shape {' '.join(map(str, latent_shape))}: --data toy has the fixed latent "
                             f"shape {' '.join(map(str, ds.latent_shape))}")
        return ds
    if data in (None, "", "synthetic"):
        shape = tuple(latent_shape) if latent_shape else (in_channels, 3, 8, 8)
        return SyntheticLatents(latent_shape=shape, text_dim=text_dim, seed=seed)
    return TensorFileLatents(data, max_latent_magnitude)
