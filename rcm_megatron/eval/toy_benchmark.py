"""The toy-task benchmark: held-out data, generation by teacher / student, and their metrics.

Generated sample j has class j % 4 (balanced) and is drawn with noise keyed by
(``seed``, j); the held-out reference is the toy dataset with ``HELD_OUT_SEED`` (training
uses the run's --seed, 1234 by default; samples are continuous draws, so the sets do not
overlap). Everything here is deterministic given the model and the arguments.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..data.toy import LATENT_SHAPE, NUM_CLASSES, ToyVideoLatents, class_embeddings
from .metrics import evaluate_features
from .sampling import student_sample, teacher_sample
from .toy_features import toy_features

HELD_OUT_SEED = 424242
SAMPLE_SEED = 7


def held_out(n: int, seed: int = HELD_OUT_SEED) -> tuple[Tensor, Tensor]:
    """(latents [n, 4, 4, 8, 8] float64, class labels [n]) of the held-out reference set."""
    ds = ToyVideoLatents(num_samples=n, seed=seed)
    return ds.batch(range(n))["latents"].to(torch.float64), ds.class_labels(range(n))


def reference_features(n: int, seed: int = HELD_OUT_SEED) -> tuple[Tensor, Tensor]:
    x, labels = held_out(n, seed)
    return toy_features(x, labels), labels


def prompts(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(context [n, L, D] for the labels, unconditional [1, L, D])."""
    p, u = class_embeddings()
    return p[labels], u[None]


def generate(model, kind: str, n: int, *, steps: int, seed: int = SAMPLE_SEED, cfg_scale: float = 1.0,
             shift: float = 3.0, mid_times=None, sigma_max: float = 80.0, batch_size: int = 512,
             progress=None) -> tuple[Tensor, Tensor]:
    """(samples [n, ...] float64, labels [n]); kind 'teacher' (Euler + CFG) or 'student' (few-step).

    Sampled ``batch_size`` at a time (noise is keyed by sample index, so another batch size changes
    only float32 rounding);
    ``progress(done, n)`` is called after each batch."""
    if kind not in ("teacher", "student"):
        raise ValueError(f"kind: expected 'teacher' or 'student', got {kind!r}")
    labels = torch.arange(n) % NUM_CLASSES
    device = next(model.parameters()).device
    ctx, uncond = (t.to(device) for t in prompts(labels))
    kw = {} if mid_times is None else {"mid_times": tuple(mid_times)}
    parts = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        if kind == "teacher":
            x = teacher_sample(model, ctx[idx], uncond, LATENT_SHAPE, idx, seed=seed, steps=steps,
                               cfg_scale=cfg_scale, shift=shift, batch_size=batch_size)
        else:
            x = student_sample(model, ctx[idx], LATENT_SHAPE, idx, seed=seed, num_steps=steps, sigma_max=sigma_max,
                               batch_size=batch_size, **kw)
        parts.append(x.cpu())
        if progress is not None:
            progress(idx[-1] + 1, n)
    return torch.cat(parts), labels


def evaluate_model(model, kind: str, ref: tuple[Tensor, Tensor], n: int, *, steps: int, progress=None, **kw) -> dict:
    """Generate n samples and return their metrics (plus timing and the settings)."""
    t0 = time.perf_counter()
    x, labels = generate(model, kind, n, steps=steps, progress=progress, **kw)
    seconds = time.perf_counter() - t0
    out = evaluate_features(toy_features(x, labels), labels, *ref)
    out.update({"kind": kind, "steps": steps, "seconds": round(seconds, 2),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}})
    return out


def data_floor(n: int, ref: tuple[Tensor, Tensor], seed: int = HELD_OUT_SEED + 1) -> dict:
    """Metrics of n further *data* samples vs the reference: the best any generator can score at this n."""
    feats, labels = reference_features(n, seed)
    out = evaluate_features(feats, labels, *ref)
    out.update({"kind": "data", "steps": 0})
    return out
