"""The toy image-to-video benchmark: the toy benchmark (toy_benchmark.py) with each generated
video conditioned on the first frame of a held-out video.

Generated sample j continues held-out sample j (class j % 4, its first latent frame given in the
model's layout, ``data/conditions.py``), with noise keyed by (``seed``, j). Reported per model:
the toy metrics against the held-out set (FD, coverage, precision, ...) and the first-frame error
(``data.toy_i2v.first_frame_error``: RMS of generated minus given first latent frame, relative to
the given frame's RMS; 0 = kept exactly, by construction in the TI2V layout, learned in the
channel-concat layout).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..data.conditions import batch_conditioning
from ..data.toy import LATENT_SHAPE
from ..data.toy_i2v import ToyI2VLatents, first_frame_error
from .metrics import evaluate_features
from .sampling import student_sample, teacher_sample
from .toy_benchmark import HELD_OUT_SEED, SAMPLE_SEED, prompts
from .toy_features import toy_features


def held_out_i2v(n: int, seed: int = HELD_OUT_SEED) -> dict:
    """The held-out set as an I2V batch (latents, context, first_frame, image_embeds, index) + labels."""
    ds = ToyI2VLatents(num_samples=n, seed=seed)
    return ds.batch(range(n)) | {"labels": ds.class_labels(range(n))}


def generate(model, kind: str, held: dict, *, steps: int, seed: int = SAMPLE_SEED, cfg_scale: float = 1.0,
             shift: float = 3.0, mid_times=None, sigma_max: float = 80.0, batch_size: int = 256) -> Tensor:
    """Samples [n, ...] float64 continuing the held-out first frames; kind 'teacher' (Euler + CFG) or
    'student' (few-step)."""
    if kind not in ("teacher", "student"):
        raise ValueError(f"kind: expected 'teacher' or 'student', got {kind!r}")
    device = next(model.parameters()).device
    labels = held["labels"]
    ctx, uncond = (t.to(device) for t in prompts(labels))
    cond = batch_conditioning(held, model.config, device)
    idx = list(range(labels.shape[0]))
    if kind == "teacher":
        return teacher_sample(model, ctx, uncond, LATENT_SHAPE, idx, seed=seed, steps=steps, cfg_scale=cfg_scale,
                              shift=shift, batch_size=batch_size, cond=cond).cpu()
    kw = {} if mid_times is None else {"mid_times": tuple(mid_times)}
    return student_sample(model, ctx, LATENT_SHAPE, idx, seed=seed, num_steps=steps, sigma_max=sigma_max,
                          batch_size=batch_size, cond=cond, **kw).cpu()


def evaluate_model(model, kind: str, held: dict, ref: tuple[Tensor, Tensor], *, steps: int, **kw) -> dict:
    """Generate one video per held-out first frame; the toy metrics and the first-frame error."""
    t0 = time.perf_counter()
    x = generate(model, kind, held, steps=steps, **kw)
    seconds = time.perf_counter() - t0
    err = first_frame_error(x, held["first_frame"])
    out = evaluate_features(toy_features(x, held["labels"]), held["labels"], *ref)
    out.update({"kind": kind, "steps": steps, "seconds": round(seconds, 2),
                "first_frame_error": float(err.mean()), "first_frame_error_max": float(err.max()),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}})
    return out
