"""A built-in toy video task whose quality and diversity can be measured exactly.

Latent videos [C=4, T=4, H=8, W=8] of ``NUM_CLASSES`` = 4 classes. Every sample of class c
is one band-limited pattern translating over the 8x8 torus:

    x[:, t, r] = A * u_c * sum_j a_cj cos(2 pi k_cj . (r - p - v t) / 8 + phi_cj),   j = 1, 2, 3

- u_c: the class colour, a unit vector in channel space (the four colours are orthonormal);
- k_c1 = (1, 0), k_c2 = (0, 1): coarse waves; k_c3 (|k| ~ 3): the class's *fine detail*,
  whose phase is locked to the coarse ones (the "coherence" phi_c3 - a phi_c1 - b phi_c2
  for k_c3 = a k_c1 + b k_c2 is a fixed property of the class);
- the *mode* m in 0..3 is the motion direction: v = (2, 0), (0, 2), (-2, 0), (0, -2) pixels
  per frame along (H, W) for classes 0 and 2, the diagonals (2, 2), (-2, 2), (-2, -2),
  (2, -2) for classes 1 and 3 (one 2x2 latent patch per frame, straight or diagonal);
- within a mode: position p ~ U([0, 8)^2) and amplitude A ~ U(0.8, 1.2).

Because the patterns are band-limited, sub-pixel translation is exact and every parameter
(class colour, amplitudes, velocity, position, detail coherence) is recovered analytically
from a 2-D DFT of the colour-projected frames (``rcm_megatron.eval.toy_features``).

The class is conveyed only by the text embedding: a fixed random [TEXT_LEN, TEXT_DIM]
embedding per class; ``negative_context`` is a further fixed embedding that plays the
unconditional (empty / negative prompt) role for classifier-free guidance. Embeddings and
class definitions are properties of the task (fixed seed); the dataset ``seed`` only picks
the samples, so a held-out set is the same task with another seed. Sample i has class
i % 4 and mode (i // 4) % 4, so any 16 consecutive indices are exactly balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .datasets import LatentDataset

LATENT_SHAPE = (4, 4, 8, 8)
NUM_CLASSES = 4
NUM_MODES = 4
TEXT_LEN = 4
TEXT_DIM = 32
STEP = 2.0  # pixels per frame along each moving axis (one 2x2 patch)
AMPLITUDE_RANGE = (0.8, 1.2)
TASK_SEED = 20251010  # class colours and text embeddings; never the sample seed


@dataclass(frozen=True)
class ToyClass:
    """One class: colour [C], wavevectors k_j = (k_h, k_w), amplitudes a_j, phases phi_j (j = 1..3)."""

    color: tuple[float, ...]
    wavevectors: tuple[tuple[int, int], ...]
    amplitudes: tuple[float, ...]
    phases: tuple[float, ...]
    velocities: tuple[tuple[float, float], ...]  # per mode, pixels per frame along (H, W)

    def velocity(self, mode: int) -> tuple[float, float]:
        return self.velocities[mode]

    @property
    def coherence_phase(self) -> float:
        """phi_3 - a phi_1 - b phi_2 for k_3 = a k_1 + b k_2 (k_1, k_2 are the unit vectors)."""
        a, b = self.wavevectors[2]
        return self.phases[2] - a * self.phases[0] - b * self.phases[1]


def _classes() -> tuple[ToyClass, ...]:
    g = torch.Generator().manual_seed(TASK_SEED)
    q, _ = torch.linalg.qr(torch.randn(LATENT_SHAPE[0], LATENT_SHAPE[0], generator=g, dtype=torch.float64))
    fine = ((3, 1), (1, 3), (2, -2), (2, 2))
    amps = ((2.0, 1.6, 1.2), (1.6, 2.0, 1.2), (1.8, 1.8, 1.0), (2.2, 1.2, 1.2))
    coh = (0.5, 1.5, -1.0, 2.5)
    straight = ((STEP, 0.0), (0.0, STEP), (-STEP, 0.0), (0.0, -STEP))
    diagonal = ((STEP, STEP), (-STEP, STEP), (-STEP, -STEP), (STEP, -STEP))
    out = []
    for c in range(NUM_CLASSES):
        out.append(ToyClass(
            color=tuple(q[:, c].tolist()), wavevectors=((1, 0), (0, 1), fine[c]), amplitudes=amps[c],
            phases=(0.0, 0.0, coh[c]),
            velocities=straight if c % 2 == 0 else diagonal))
    return tuple(out)


CLASSES = _classes()


def class_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """([NUM_CLASSES, TEXT_LEN, TEXT_DIM] class prompts, [TEXT_LEN, TEXT_DIM] unconditional)."""
    g = torch.Generator().manual_seed(TASK_SEED + 1)
    prompts = torch.randn(NUM_CLASSES, TEXT_LEN, TEXT_DIM, generator=g)
    uncond = torch.randn(TEXT_LEN, TEXT_DIM, generator=g)
    return prompts, uncond


def render(cls: ToyClass, position, velocity, amplitude: float, frames: int = LATENT_SHAPE[1],
           size: tuple[int, int] = LATENT_SHAPE[2:]) -> torch.Tensor:
    """The clean video [C, T, H, W] (float64) of one class at one (p, v, A)."""
    h, w = size
    tt, hh, ww = torch.meshgrid(torch.arange(frames, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")
    ph = hh - position[0] - velocity[0] * tt
    pw = ww - position[1] - velocity[1] * tt
    s = torch.zeros(frames, h, w, dtype=torch.float64)
    for (kh, kw), a, phi in zip(cls.wavevectors, cls.amplitudes, cls.phases):
        s += a * torch.cos(2 * math.pi * (kh * ph / h + kw * pw / w) + phi)
    color = torch.tensor(cls.color, dtype=torch.float64)
    return amplitude * color[:, None, None, None] * s[None]


def render_batch(params: list[dict]) -> torch.Tensor:
    """``render`` of many samples' ``sample_params`` at once: [N, C, T, H, W] float64."""
    _, frames, h, w = LATENT_SHAPE
    cls = [CLASSES[p["class"]] for p in params]
    pos = torch.tensor([p["position"] for p in params], dtype=torch.float64)  # [N, 2]
    vel = torch.tensor([c.velocity(p["mode"]) for c, p in zip(cls, params)], dtype=torch.float64)
    amp = torch.tensor([p["amplitude"] for p in params], dtype=torch.float64)
    kv = torch.tensor([c.wavevectors for c in cls], dtype=torch.float64)  # [N, 3, 2]
    a = torch.tensor([c.amplitudes for c in cls], dtype=torch.float64)  # [N, 3]
    phi = torch.tensor([c.phases for c in cls], dtype=torch.float64)
    color = torch.tensor([c.color for c in cls], dtype=torch.float64)  # [N, C]
    tt, hh, ww = torch.meshgrid(torch.arange(frames, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")
    ph = hh[None] - pos[:, 0, None, None, None] - vel[:, 0, None, None, None] * tt[None]  # [N, T, H, W]
    pw = ww[None] - pos[:, 1, None, None, None] - vel[:, 1, None, None, None] * tt[None]
    arg = 2 * math.pi * (kv[:, :, 0, None, None, None] * ph[:, None] / h + kv[:, :, 1, None, None, None] * pw[:, None] / w)
    s = (a[:, :, None, None, None] * torch.cos(arg + phi[:, :, None, None, None])).sum(1)  # [N, T, H, W]
    return amp[:, None, None, None, None] * color[:, :, None, None, None] * s[:, None]


def sample_params(seed: int, index: int) -> dict:
    """Class, mode and the continuous parameters of sample ``index`` (deterministic)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    lo, hi = AMPLITUDE_RANGE
    return {"class": index % NUM_CLASSES, "mode": (index // NUM_CLASSES) % NUM_MODES,
            "position": (8.0 * u[0], 8.0 * u[1]), "amplitude": lo + (hi - lo) * u[2]}


class ToyVideoLatents(LatentDataset):
    """The toy task as a LatentDataset (``--data toy``); see the module docstring."""

    def __init__(self, num_samples: int = 65536, seed: int = 1234):
        self.latent_shape = LATENT_SHAPE
        self.text_len, self.text_dim = TEXT_LEN, TEXT_DIM
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.prompts, self.negative_context = class_embeddings()

    def __len__(self):
        return self.num_samples

    def params(self, i: int) -> dict:
        return sample_params(self.seed, i)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside 0..{self.num_samples - 1}")
        p = self.params(i)
        cls = CLASSES[p["class"]]
        x = render(cls, p["position"], cls.velocity(p["mode"]), p["amplitude"])
        return {"latents": x.float(), "context": self.prompts[p["class"]].clone()}

    def batch(self, indices) -> dict:
        """Vectorized ``LatentDataset.batch`` (same values as stacking ``self[i]``)."""
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < self.num_samples:
                raise IndexError(f"sample {i} outside 0..{self.num_samples - 1}")
        params = [self.params(i) for i in idx]
        labels = torch.tensor([p["class"] for p in params])
        return {"latents": render_batch(params).float(), "context": self.prompts[labels].clone(),
                "index": torch.as_tensor(idx, dtype=torch.long)}

    def class_labels(self, indices) -> torch.Tensor:
        return torch.as_tensor([int(i) % NUM_CLASSES for i in indices], dtype=torch.long)
