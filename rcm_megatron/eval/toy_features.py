"""The fixed feature space of the toy task (rcm_megatron/data/toy.py), recovered analytically.

For a latent video x [C, T, H, W] generated for class c, let y_t = u_c^T x[:, t] be the
frame projected on the class colour and Y_t(k) = sum_r y_t(r) exp(-2 pi i k.r / 8) its 2-D
DFT. A clean sample A u_c sum_j a_j cos(2 pi k_j.(r - p - v t)/8 + phi_j) has exactly
Y_t(k_j) = 32 A a_j exp(i (phi_j - 2 pi k_j.(p + v t)/8)), so:

  amp_j     = mean_t |Y_t(k_j)| / (32 a_j)                    = A          (j = 1, 2, 3)
  v_h, v_w  = -8/(2 pi) angle(sum_t Y_{t+1}(k_j) conj Y_t(k_j)), j = 1, 2  = v (px/frame)
  pos       = cos, sin of angle(Y_0(k_j)) - phi_j, j = 1, 2     (uniform on the torus)
  coh       = mean_t exp(i (angle Y_t(k_3) - a angle Y_t(k_1) - b angle Y_t(k_2) - coh_c))
              (k_3 = a k_1 + b k_2): 1 + 0i when the fine detail is in phase with the coarse
              waves, anywhere on the unit disc otherwise (re, im)
  residual  = 1 - (energy of y at +-k_1,2,3) / (energy of x) = 0  (off-model energy)
  purity    = (energy of y) / (energy of x)                     = 1  (right colour / class)

These 13 numbers, in this order (``FEATURE_NAMES``), are the feature space of the Frechet
distance: no learned network, no standardization, same for every run. Mode assignment is
the nearest of the class's four mode velocities; a sample is *valid* (counts for
precision) when it is near the data manifold in every feature (``VALID``): all held-out
data are valid by construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data.toy import CLASSES, LATENT_SHAPE, NUM_MODES

FEATURE_NAMES = ("amp_1", "amp_2", "amp_3", "v_h", "v_w", "pos1_cos", "pos1_sin", "pos2_cos", "pos2_sin",
                 "coh_re", "coh_im", "residual", "purity")

# Validity thresholds: data have amp in [0.8, 1.2], velocity error 0, coh_re 1, residual 0, purity 1.
VALID = {"amp_min": 0.6, "amp_max": 1.5, "velocity_tol": 0.5, "coh_re_min": 0.8, "residual_max": 0.15,
         "purity_min": 0.9}


def _class_tables(device):
    colors = torch.tensor([c.color for c in CLASSES], dtype=torch.float64, device=device)  # [K, C]
    kv = torch.tensor([c.wavevectors for c in CLASSES], dtype=torch.long, device=device)  # [K, 3, 2]
    amps = torch.tensor([c.amplitudes for c in CLASSES], dtype=torch.float64, device=device)  # [K, 3]
    phases = torch.tensor([c.phases for c in CLASSES], dtype=torch.float64, device=device)  # [K, 3]
    coh = torch.tensor([c.coherence_phase for c in CLASSES], dtype=torch.float64, device=device)  # [K]
    vel = torch.tensor([[c.velocity(m) for m in range(NUM_MODES)] for c in CLASSES], dtype=torch.float64,
                       device=device)  # [K, M, 2]
    return colors, kv, amps, phases, coh, vel


def toy_features(x: Tensor, labels: Tensor) -> Tensor:
    """[N, 13] float64 features (``FEATURE_NAMES``) of videos x [N, C, T, H, W] meant as class ``labels`` [N]."""
    if x.dim() != 5 or tuple(x.shape[1:]) != LATENT_SHAPE:
        raise ValueError(f"toy_features: expected [N, {', '.join(map(str, LATENT_SHAPE))}], got {tuple(x.shape)}")
    x = x.detach().to(torch.float64).cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    n, _, t, h, w = x.shape
    colors, kv, amps, phases, coh, _ = _class_tables(x.device)
    total = x.square().flatten(1).sum(1).clamp_min(1e-12)
    y = torch.einsum("nc,ncthw->nthw", colors[labels], x)
    purity = y.square().flatten(1).sum(1) / total
    Y = torch.fft.fft2(y)  # [N, T, H, W], Y[k_h mod H, k_w mod W]
    k = kv[labels]  # [N, 3, 2]
    rows = torch.arange(n)[:, None, None]
    Yk = Y[rows, torch.arange(t)[None, :, None], (k[:, None, :, 0] % h), (k[:, None, :, 1] % w)]  # [N, T, 3]
    half = h * w / 2
    amp = Yk.abs().mean(1) / (half * amps[labels])  # [N, 3]
    step = (Yk[:, 1:, :2] * Yk[:, :-1, :2].conj()).sum(1)  # [N, 2]
    vel = -(h / (2 * math.pi)) * torch.angle(step)  # k_1 = (1,0) -> v_h, k_2 = (0,1) -> v_w (H = W = 8)
    psi = torch.angle(Yk[:, 0, :2]) - phases[labels][:, :2]
    ang = torch.angle(Yk)
    a, b = k[:, 2, 0].to(torch.float64), k[:, 2, 1].to(torch.float64)
    theta = ang[..., 2] - a[:, None] * ang[..., 0] - b[:, None] * ang[..., 1] - coh[labels][:, None]
    c = torch.polar(torch.ones_like(theta), theta).mean(1)
    explained = 2 * Yk.abs().square().sum((1, 2)) / (h * w)
    residual = 1 - explained / total
    return torch.stack([amp[:, 0], amp[:, 1], amp[:, 2], vel[:, 0], vel[:, 1], psi[:, 0].cos(), psi[:, 0].sin(),
                        psi[:, 1].cos(), psi[:, 1].sin(), c.real, c.imag, residual, purity], dim=1)


def assign_modes(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(mode [N] = nearest mode velocity of the sample's class, distance [N] in px/frame)."""
    _, _, _, _, _, vel = _class_tables(features.device)
    v = features[:, 3:5]
    d = (vel[torch.as_tensor(labels, dtype=torch.long)] - v[:, None, :]).norm(dim=-1)  # [N, M]
    dist, mode = d.min(dim=1)
    return mode, dist


def criteria(features: Tensor, labels: Tensor, thresholds: dict | None = None) -> dict[str, Tensor]:
    """[N] bool per validity criterion: coarse amplitudes, fine-detail amplitude, motion (a mode's
    velocity), fine-detail phase coherence, off-model residual, colour purity."""
    th = {**VALID, **(thresholds or {})}
    amp = features[:, 0:3]
    ok = (amp >= th["amp_min"]) & (amp <= th["amp_max"])
    _, dist = assign_modes(features, labels)
    return {"coarse": ok[:, :2].all(1), "detail": ok[:, 2], "motion": dist <= th["velocity_tol"],
            "coherence": features[:, 9] >= th["coh_re_min"], "residual": features[:, 11] <= th["residual_max"],
            "purity": features[:, 12] >= th["purity_min"]}


def valid_mask(features: Tensor, labels: Tensor, thresholds: dict | None = None) -> Tensor:
    """[N] bool: on the data manifold of its class in every feature (all ``criteria``, see ``VALID``)."""
    out = None
    for ok in criteria(features, labels, thresholds).values():
        out = ok if out is None else out & ok
    return out
