"""Distribution metrics on fixed features: Frechet distance, mode coverage, precision, diversity.

All of them compare generated samples of known intended class against held-out data of
the same classes, in the feature space of ``toy_features`` (any [N, D] features work for
``frechet_distance``):

- ``fd``: Frechet distance between Gaussians fitted to generated and held-out features,
  computed per class and averaged over classes (a class-conditional FD; a sample of the
  wrong class is far away in the class-relative features). ``fd_pooled`` ignores classes.
- ``coverage``: fraction of the (class, mode) pairs that receive at least a quarter of
  their fair share (1 / (4 M)) of the class's *moving* samples: those of the right colour
  whose velocity is within tolerance of one of the class's modes (whatever their detail).
- ``precision``: fraction of generated samples that are valid (near the data manifold of
  the intended class in every feature, ``toy_features.VALID``).
- ``mode_entropy``: exp(entropy of the class's mode histogram over moving samples) / M,
  averaged over classes; 1 = all modes equally often, 1/M = a single mode.
- ``diversity``: within-class spread, sqrt(trace Cov(features of the class)) relative to the
  held-out data's, averaged over classes; 1 = as diverse as the data, < 1 = collapsed.
- ``criteria``: pass rate of each validity criterion alone (coarse / detail amplitude, motion,
  detail coherence, residual, purity); ``detail_amplitude`` / ``detail_coherence``: mean
  amp_3 and coh_re (fine detail; data: 1.0 and 1.0); ``speed``: mean |v| (data: 2 or 2.83).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data.toy import NUM_CLASSES, NUM_MODES
from .toy_features import FEATURE_NAMES, assign_modes, criteria, valid_mask


def _mean_cov(f: Tensor) -> tuple[Tensor, Tensor]:
    f = f.to(torch.float64)
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / max(f.shape[0] - 1, 1)


def _sqrt_psd(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), float64, exact symmetric form."""
    mu1, s1 = _mean_cov(f1)
    mu2, s2 = _mean_cov(f2)
    r1 = _sqrt_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def evaluate_features(gen: Tensor, gen_labels: Tensor, ref: Tensor, ref_labels: Tensor) -> dict:
    """All metrics of generated features vs held-out features (see module docstring)."""
    gen_labels = torch.as_tensor(gen_labels, dtype=torch.long)
    ref_labels = torch.as_tensor(ref_labels, dtype=torch.long)
    finite = torch.isfinite(gen).all(1)
    gen = torch.where(finite[:, None], gen, torch.zeros_like(gen))
    crit = {k: v & finite for k, v in criteria(gen, gen_labels).items()}
    valid = valid_mask(gen, gen_labels) & finite
    moving = crit["motion"] & crit["purity"]
    modes, _ = assign_modes(gen, gen_labels)
    per_class = []
    for c in range(NUM_CLASSES):
        g, r = gen_labels == c, ref_labels == c
        fg, fr = gen[g], ref[r]
        counts = torch.bincount(modes[g & moving], minlength=NUM_MODES).to(torch.float64)
        n_valid = counts.sum().item()
        share = counts / max(n_valid, 1)
        covered = (share >= 1.0 / (4 * NUM_MODES)) & (counts > 0)
        p = share[share > 0]
        entropy = float(-(p * p.log()).sum()) if n_valid else 0.0
        spread_g = math.sqrt(max(_mean_cov(fg)[1].trace().item(), 0.0))
        spread_r = math.sqrt(max(_mean_cov(fr)[1].trace().item(), 1e-12))
        per_class.append({
            "class": c, "n": int(g.sum()), "fd": frechet_distance(fg, fr), "precision": float(valid[g].float().mean()),
            "modes_covered": int(covered.sum()), "mode_share": [round(float(s), 4) for s in share],
            "mode_entropy": math.exp(entropy) / NUM_MODES, "diversity": spread_g / spread_r,
            "feature_mean": [round(float(v), 4) for v in fg.mean(0)],
        })
    mean = lambda key: sum(pc[key] for pc in per_class) / len(per_class)  # noqa: E731
    return {
        "fd": mean("fd"), "fd_pooled": frechet_distance(gen, ref),
        "coverage": sum(pc["modes_covered"] for pc in per_class) / (NUM_CLASSES * NUM_MODES),
        "precision": float(valid.float().mean()), "mode_entropy": mean("mode_entropy"),
        "diversity": mean("diversity"), "nonfinite": int((~finite).sum()),
        "num_samples": int(gen.shape[0]), "per_class": per_class, "feature_names": list(FEATURE_NAMES),
        "criteria": {k: float(v.float().mean()) for k, v in crit.items()},
        "detail_amplitude": float(gen[:, 2].mean()), "detail_coherence": float(gen[:, 9].mean()),
        "speed": float(gen[:, 3:5].norm(dim=1).mean()),
    }
