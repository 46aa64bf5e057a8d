"""rCM loss terms (docs/design.md §2), each as "make targets" + "regression".

Every training pass is a regression. ``*_targets`` run forward-only passes (teacher with
CFG, the tangent pass, fake score) and return fixed per-sample tensors; ``*_regression``
runs the single with-grad forward of the trained network and regresses it:
  sCM:    F_theta(x_t, t)        -> F_sg + g
  DMD:    G = last rollout step  -> sg(G) - grad
  critic: x0_fake(x_D, t_D)      -> G               (weight 1/sin^2 t_D)
  dCM:    x0_theta(x_t, t)       -> sg(x0_theta(x_t', t'))
For sCM and DMD the target is sg(own output) + a fixed step (g, -grad), formed inside the
regression from the with-grad output itself, as in the method: a target built from a
separate forward would differ from F_theta by kernel rounding (bf16 ~ 4e-3 per element),
larger than the unit-norm g spread over ~1e6 elements, and would swamp the gradient.

Randomness (eps, t) is passed in so these stay pure functions; step.py draws it keyed per
sample. Per-sample losses are sums over C,T,H,W in float64; samples with a non-finite
target or prediction get loss 0 (their g / grad / prediction are zeroed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.dispatch import training_pass
from .conditioning import Conditioning, resolve
from .config import TANGENT_WARMUP_FORMS
from .protocol import VelocityNet
from .rollout import RolloutResult
from .trigflow import (add_noise, expand_time, guided_predict, predict, predict_with_tangent, rf_to_trig,
                       wan_time_shift)


@dataclass
class LossTerms:
    """loss = per_sample.sum() (graph attached); per_sample [B] float64; target detached."""

    loss: Tensor
    per_sample: Tensor
    target: Tensor


def per_sample_finite(x: Tensor) -> Tensor:
    """[B] bool: every element of sample i is finite."""
    return torch.isfinite(x).flatten(1).all(dim=1)


def _mask(valid: Tensor, x: Tensor) -> Tensor:
    return torch.where(valid.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sum_sq(x: Tensor) -> Tensor:
    return x.square().flatten(1).sum(dim=1)


def _regress(pred: Tensor, valid: Tensor, weight, *, target: Tensor | None = None, step: Tensor | None = None,
             cond: Conditioning | None = None) -> LossTerms:
    """weight * sum((pred - target)^2) per sample; target = sg(pred) + step when ``step`` is given.
    Given (not generated) positions of ``cond`` are excluded: 0 in pred and target."""
    cond = resolve(cond)
    pred = cond.exclude(pred)
    target = None if target is None else cond.exclude(target)
    valid = valid & per_sample_finite(pred)
    pred = _mask(valid, pred)
    target = pred.detach() + step if target is None else target
    target = _mask(valid, target.detach())
    per = weight * _sum_sq(pred - target)
    return LossTerms(loss=per.sum(), per_sample=per, target=target)


# ---------------------------------------------------------------- sCM


def tangent_g(F_sg: Tensor, F_T: Tensor, dF: Tensor, x_t: Tensor, cos: Tensor, sin: Tensor, r: float,
              form: str = "f9b7be9") -> Tensor:
    """The sCM tangent g at warmup ratio r (r = 1 after warmup, where both forms agree).

    'f9b7be9' (default): the official code since NVlabs/rcm commit f9b7be9 (2026-01-08), r scales
    only the x_t term:  g = -cos t sqrt(1 - r^2 sin^2 t) (F_sg - F_T) - (r cos t sin t x_t + dF).
    'pre-f9b7be9': the official code before that commit, r scales dF too:
                        g = -cos t sqrt(1 - r^2 sin^2 t) (F_sg - F_T) - r (cos t sin t x_t + dF).
    """
    first = -cos * torch.sqrt(1 - r**2 * sin**2) * (F_sg - F_T)
    if form == "f9b7be9":
        return first - (r * cos * sin * x_t + dF)
    if form == "pre-f9b7be9":
        return first - r * (cos * sin * x_t + dF)
    raise ValueError(f"tangent warmup form must be one of {TANGENT_WARMUP_FORMS}, got {form!r}")


@dataclass
class SCMTargets:
    """x_t, t: regression input; g: normalized tangent step (0 where invalid); g_norm: raw ||g||."""

    x_t: Tensor
    t: Tensor
    g: Tensor
    valid: Tensor
    g_norm: Tensor


@torch.no_grad()
def scm_targets(
    teacher: VelocityNet, student: VelocityNet, x0: Tensor, eps: Tensor, t: Tensor, context: Tensor,
    uncond_context: Tensor, *, cfg_scale: float, r: float, g_norm_eps: float = 0.1, warmup_form: str = "f9b7be9",
    cond: Conditioning | None = None,
) -> SCMTargets:
    """Steps 1, 2, 4, 5 of sCM: teacher F_T with CFG, student tangent, g, masking, normalization.

    dF = cos t sin t dF_theta/dt along the PF-ODE (tangents dx = cos t sin t F_T, dt = cos t sin t);
    F_sg here is the tangent pass's primal output. ``tangent_g`` forms g for the warmup ratio r.
    Given frames of ``cond`` are masked out of g before its norm (they are not generated).
    """
    x_t = add_noise(x0, eps, t)
    with training_pass("teacher CFG (sCM)"):
        F_T = guided_predict(teacher, x_t, t, context, uncond_context, cfg_scale, cond).F
    tb = expand_time(t, x_t)
    cos, sin = torch.cos(tb), torch.sin(tb)
    with training_pass("student tangent"):
        F_sg, dF = predict_with_tangent(student, x_t, t, context, cos * sin * F_T, (cos * sin).flatten(), cond)
    g = resolve(cond).exclude(tangent_g(F_sg, F_T, dF, x_t, cos, sin, r, warmup_form))
    valid = per_sample_finite(g)
    g = _mask(valid, g)
    norm = g.flatten(1).norm(dim=1)
    g = g / expand_time(norm + g_norm_eps, g)
    return SCMTargets(x_t=x_t, t=torch.as_tensor(t, dtype=torch.float64), g=g, valid=valid, g_norm=norm)


def scm_regression(student: VelocityNet, targets: SCMTargets, context: Tensor, scale: float = 100.0,
                   cond: Conditioning | None = None) -> LossTerms:
    """Step 3 + 6: scale * sum((F_theta - F_sg - g)^2), F_sg = F_theta detached."""
    with training_pass("student with-grad (sCM)"):
        F = predict(student, targets.x_t, targets.t, context, cond).F
    return _regress(F, targets.valid, scale, step=targets.g, cond=cond)


# ---------------------------------------------------------------- DMD


@dataclass
class DMDTargets:
    """last_x, last_t: recompute input of G; grad: DMD direction (0 where invalid); weight [B]."""

    last_x: Tensor
    last_t: Tensor
    G: Tensor
    grad: Tensor
    valid: Tensor
    weight: Tensor
    t_D: Tensor
    num_steps: Tensor


@torch.no_grad()
def dmd_targets(
    teacher: VelocityNet, fake_score: VelocityNet, rollout: RolloutResult, eps: Tensor, t_D: Tensor,
    context: Tensor, uncond_context: Tensor, *, cfg_scale: float, weight_clip: float = 1e-5,
    cond: Conditioning | None = None,
) -> DMDTargets:
    """x_D = cos t_D G + sin t_D eps; grad = (x0_fake - x0_T)/max(mean|G - x0_T|, clip), the mean
    and grad over generated positions only (given frames of ``cond`` are excluded)."""
    c = resolve(cond)
    G = rollout.x0
    x_D = add_noise(G, eps, t_D)
    with training_pass("fake score (DMD)"):
        x0_fake = predict(fake_score, x_D, t_D, context, cond).x0
    with training_pass("teacher CFG (DMD)"):
        x0_T = guided_predict(teacher, x_D, t_D, context, uncond_context, cfg_scale, cond).x0
    diff = (c.exclude(G - x0_T).abs().flatten(1))
    # mean over the generated elements (all of them without given frames: .mean(), bit for bit as before)
    mean = diff.mean(dim=1) if c.given is None else diff.sum(dim=1) / c.num_generated(G)
    weight = mean.clamp_min(weight_clip)
    grad = c.exclude(x0_fake - x0_T) / expand_time(weight, G)
    valid = per_sample_finite(grad) & per_sample_finite(G)
    return DMDTargets(last_x=rollout.last_x, last_t=rollout.last_t, G=G, grad=_mask(valid, grad), valid=valid,
                      weight=weight, t_D=torch.as_tensor(t_D, dtype=torch.float64), num_steps=rollout.num_steps)


def dmd_regression(student: VelocityNet, targets: DMDTargets, context: Tensor, scale: float = 1.0,
                   cond: Conditioning | None = None) -> LossTerms:
    """scale * sum((G - sg(G - grad))^2) with G the last rollout step recomputed with grad."""
    with training_pass("student with-grad (DMD)"):
        G = predict(student, targets.last_x, targets.last_t, context, cond).x0
    return _regress(G, targets.valid, scale, step=-targets.grad, cond=cond)


# ---------------------------------------------------------------- critic (fake score)


@dataclass
class CriticTargets:
    x_D: Tensor
    t_D: Tensor
    G: Tensor
    valid: Tensor


@torch.no_grad()
def critic_targets(G: Tensor, eps: Tensor, t_D: Tensor) -> CriticTargets:
    """The fake score denoises x_D = cos t_D G + sin t_D eps back to the student's G."""
    G = G.to(torch.float64)
    return CriticTargets(x_D=add_noise(G, eps, t_D), t_D=torch.as_tensor(t_D, dtype=torch.float64), G=G,
                         valid=per_sample_finite(G))


def critic_regression(fake_score: VelocityNet, targets: CriticTargets, context: Tensor, scale: float = 1.0,
                      cond: Conditioning | None = None) -> LossTerms:
    """scale * sum((G - x0_fake(x_D, t_D))^2)/sin^2 t_D over generated positions."""
    with training_pass("fake score with-grad (critic)"):
        x0 = predict(fake_score, targets.x_D, targets.t_D, context, cond).x0
    weight = scale / torch.sin(targets.t_D.to(x0.device)) ** 2
    return _regress(x0, targets.valid, weight, target=targets.G, cond=cond)


# ---------------------------------------------------------------- discrete-time CM baseline


def dcm_time_grid(num_steps: int, shift: float) -> Tensor:
    """t_0 = 0 < ... < t_N = pi/2: RF times s_i = k u_i/(1+(k-1)u_i), u_i = i/N (Wan's
    shifted sampling grid, shift k), mapped to TrigFlow t."""
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return rf_to_trig(wan_time_shift(u, shift))


@dataclass
class DCMTargets:
    x_t: Tensor
    t: Tensor
    t_prev: Tensor
    target: Tensor
    valid: Tensor


@torch.no_grad()
def dcm_targets(
    teacher: VelocityNet, student: VelocityNet, x0: Tensor, eps: Tensor, step: Tensor, grid: Tensor, skip: int,
    context: Tensor, uncond_context: Tensor, *, cfg_scale: float, cond: Conditioning | None = None,
) -> DCMTargets:
    """Discrete consistency target (baseline).

    Design: t = grid[n], n ~ U{skip..N} per sample, t' = grid[n - skip] (skip >= 1 grid
    intervals earlier). One teacher step with CFG along the PF-ODE using TrigFlow's exact
    first-order (DDIM) solver, x_t' = cos(t - t') x_t - sin(t - t') F_T, then target =
    sg(student x0_hat(x_t', t')) from the online student (no EMA target network, like the
    stop-grad in sCM). At t' = 0 the wrapper gives x0_hat = x_t' exactly (the boundary
    condition). Knobs: grid size N (dcm_num_steps), skip (dcm_skip), shift (dcm_shift);
    larger skip = fewer, longer teacher steps; skip -> 0 with N -> inf approaches sCM.
    """
    grid = grid.to(device=x0.device, dtype=torch.float64)
    step = step.to(x0.device)
    t, t_prev = grid[step], grid[step - skip]
    x_t = add_noise(x0, eps, t)
    with training_pass("teacher CFG (dCM)"):
        F_T = guided_predict(teacher, x_t, t, context, uncond_context, cfg_scale, cond).F
    d = expand_time(t - t_prev, x_t)
    x_prev = torch.cos(d) * x_t - torch.sin(d) * F_T
    with training_pass("student target (dCM)"):
        target = resolve(cond).exclude(predict(student, x_prev, t_prev, context, cond).x0)
    return DCMTargets(x_t=x_t, t=t, t_prev=t_prev, target=target, valid=per_sample_finite(target))


def dcm_regression(student: VelocityNet, targets: DCMTargets, context: Tensor, scale: float = 1.0,
                   cond: Conditioning | None = None) -> LossTerms:
    """scale * sum((x0_theta(x_t, t) - target)^2), unweighted over t."""
    with training_pass("student with-grad (dCM)"):
        x0 = predict(student, targets.x_t, targets.t, context, cond).x0
    return _regress(x0, targets.valid, scale, target=targets.target, cond=cond)
