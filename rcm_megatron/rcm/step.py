"""The single-process step plan (docs/design.md §2.5, "Every training pass is a regression").

A student or critic step is split into
  make_*_targets: forward-only passes (teacher x2 for CFG, tangent pass, rollouts, fake
                  score) producing small per-sample tensors, and
  *_regression:   one with-grad forward of the trained model against those targets,
so a pipeline-parallel schedule can run the first as forward sweeps and the second as
1F1B. ``student_step`` / ``critic_step`` chain them at PP=1 and call backward once per
loss term (gradients add up in .grad; each graph is freed before the next pass).

All randomness comes from rng.KeyedRNG(cfg.seed, iteration) keyed by the batch's global
sample indices, stream names:
  scm.t, scm.eps | dmd.rollout.{steps,times,noise,renoise.k}, dmd.t, dmd.eps |
  critic.rollout.*, critic.t, critic.eps | dcm.step, dcm.eps
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.dispatch import training_pass
from .conditioning import Conditioning
from .config import RCMConfig
from .losses import (
    CriticTargets, DCMTargets, DMDTargets, LossTerms, SCMTargets, critic_regression, critic_targets,
    dcm_regression, dcm_targets, dcm_time_grid, dmd_regression, dmd_targets, scm_regression, scm_targets,
)
from .protocol import VelocityNet
from .rng import KeyedRNG
from .rollout import RolloutResult, rollout, training_schedule
from .schedule import Phase, phase as schedule_phase, tangent_warmup_ratio


@dataclass
class Batch:
    """x0 [B,C,T,H,W] clean latents; context [B,L,D]; uncond_context [1 or B, L, D]
    (negative prompt); indices [B] int64 global sample indices (key every random draw);
    cond: image conditioning (conditioning.py), given to teacher, student and fake score in
    every pass; None for text-to-video."""

    x0: Tensor
    context: Tensor
    uncond_context: Tensor
    indices: Tensor
    cond: Conditioning | None = None

    def __post_init__(self):
        b = self.x0.shape[0]
        if self.x0.dim() != 5:
            raise ValueError(f"Batch.x0: expected [B,C,T,H,W], got shape {tuple(self.x0.shape)}")
        if self.context.dim() != 3 or self.context.shape[0] != b:
            raise ValueError(f"Batch.context: expected [{b},L,D], got shape {tuple(self.context.shape)}")
        if self.uncond_context.dim() != 3 or self.uncond_context.shape[0] not in (1, b):
            raise ValueError(f"Batch.uncond_context: expected [1 or {b},L,D], got {tuple(self.uncond_context.shape)}")
        self.indices = torch.as_tensor(self.indices, dtype=torch.int64).cpu()
        if self.indices.shape != (b,):
            raise ValueError(f"Batch.indices: expected [{b}] global sample indices, got {tuple(self.indices.shape)}")
        if self.cond is not None:
            self.cond.check(self.latent_shape, b)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[1:])


@dataclass
class StudentTargets:
    phase: Phase
    r: float
    scm: SCMTargets | None = None
    dmd: DMDTargets | None = None
    dcm: DCMTargets | None = None


def _student_rollout(cfg: RCMConfig, student: VelocityNet, batch: Batch, rng: KeyedRNG, stream: str) -> RolloutResult:
    times, num_steps = training_schedule(rng, stream, batch.indices, cfg.p_d.build(), cfg.rollout_max_steps,
                                         cfg.rollout_random_steps, cfg.rollout_fixed_times)
    with training_pass(f"student rollout ({stream.split('.')[0]})"):
        return rollout(student, batch.latent_shape, times, num_steps, batch.context, rng, stream, batch.indices,
                       batch.cond)


def _time_and_noise(rng: KeyedRNG, sampler, prefix: str, batch: Batch) -> tuple[Tensor, Tensor]:
    device = batch.x0.device
    t = sampler.sample(rng, f"{prefix}.t", batch.indices).to(device)
    return t, rng.normal(f"{prefix}.eps", batch.indices, batch.latent_shape, device=device)


def _student_phase(cfg: RCMConfig, iteration: int, phase: Phase | None) -> Phase:
    phase = schedule_phase(cfg, iteration) if phase is None else phase
    if not phase.is_student:
        raise ValueError(f"iteration {iteration} is a {phase.model} step, not a student step")
    return phase


def make_student_targets(
    cfg: RCMConfig, teacher: VelocityNet, student: VelocityNet, fake_score: VelocityNet | None, batch: Batch,
    iteration: int, phase: Phase | None = None,
) -> StudentTargets:
    """Forward-only half of a student step, for the loss terms of ``phase`` (schedule default)."""
    phase = _student_phase(cfg, iteration, phase)
    rng = KeyedRNG(cfg.seed, iteration)
    out = StudentTargets(phase=phase, r=tangent_warmup_ratio(cfg, iteration))
    if "scm" in phase.losses:
        t, eps = _time_and_noise(rng, cfg.p_g.build(), "scm", batch)
        out.scm = scm_targets(teacher, student, batch.x0, eps, t, batch.context, batch.uncond_context,
                              cfg_scale=cfg.cfg_scale, r=out.r, g_norm_eps=cfg.scm_g_norm_eps,
                              warmup_form=cfg.tangent_warmup_form, cond=batch.cond)
    if "dmd" in phase.losses:
        if fake_score is None:
            raise ValueError("DMD needs a fake score network, got None")
        res = _student_rollout(cfg, student, batch, rng, "dmd.rollout")
        t_D, eps = _time_and_noise(rng, cfg.p_d.build(), "dmd", batch)
        out.dmd = dmd_targets(teacher, fake_score, res, eps, t_D, batch.context, batch.uncond_context,
                              cfg_scale=cfg.cfg_scale, weight_clip=cfg.dmd_weight_clip, cond=batch.cond)
    if "dcm" in phase.losses:
        n = rng.randint("dcm.step", batch.indices, cfg.dcm_skip, cfg.dcm_num_steps + 1)
        eps = rng.normal("dcm.eps", batch.indices, batch.latent_shape, device=batch.x0.device)
        out.dcm = dcm_targets(teacher, student, batch.x0, eps, n, dcm_time_grid(cfg.dcm_num_steps, cfg.dcm_shift),
                              cfg.dcm_skip, batch.context, batch.uncond_context, cfg_scale=cfg.cfg_scale,
                              cond=batch.cond)
    return out


def student_regression(cfg: RCMConfig, student: VelocityNet, targets: StudentTargets, batch: Batch, name: str) -> LossTerms:
    """With-grad half of one student loss term, name in targets.phase.losses."""
    if name == "scm":
        return scm_regression(student, targets.scm, batch.context, cfg.scm_loss_scale, batch.cond)
    if name == "dmd":
        return dmd_regression(student, targets.dmd, batch.context, cfg.dmd_loss_scale, batch.cond)
    if name == "dcm":
        return dcm_regression(student, targets.dcm, batch.context, cfg.dcm_loss_scale, batch.cond)
    raise ValueError(f"unknown student loss term {name!r}")


def _mean(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64).mean()


def student_diagnostics(targets: StudentTargets) -> dict[str, Tensor]:
    d = {"r": torch.tensor(targets.r, dtype=torch.float64)}
    if targets.scm is not None:
        d |= {"scm_t_mean": _mean(targets.scm.t), "scm_g_norm_mean": _mean(targets.scm.g_norm),
              "scm_valid_frac": _mean(targets.scm.valid)}
    if targets.dmd is not None:
        d |= {"dmd_t_mean": _mean(targets.dmd.t_D), "dmd_weight_mean": _mean(targets.dmd.weight),
              "dmd_valid_frac": _mean(targets.dmd.valid), "rollout_steps_mean": _mean(targets.dmd.num_steps)}
    if targets.dcm is not None:
        d |= {"dcm_t_mean": _mean(targets.dcm.t), "dcm_valid_frac": _mean(targets.dcm.valid)}
    return d


def _normalizer(batch: Batch, loss_normalizer: float | None) -> float:
    return float(batch.x0.shape[0] if loss_normalizer is None else loss_normalizer)


def student_step(
    cfg: RCMConfig, teacher: VelocityNet, student: VelocityNet, fake_score: VelocityNet | None, batch: Batch,
    iteration: int, *, loss_normalizer: float | None = None, phase: Phase | None = None,
) -> dict[str, Tensor]:
    """Accumulate the student's gradients for this batch (no optimizer step).

    Each term's loss is sum over samples / loss_normalizer (default B; pass the global batch
    size when accumulating micro-batches or running data parallel). Returns detached
    'loss_<term>' values (their sum is the total) and diagnostics.
    """
    norm = _normalizer(batch, loss_normalizer)
    targets = make_student_targets(cfg, teacher, student, fake_score, batch, iteration, phase)
    out: dict[str, Tensor] = {}
    for name in targets.phase.losses:
        loss = student_regression(cfg, student, targets, batch, name).loss / norm
        with training_pass(f"student backward ({name})"):
            loss.backward()
        out[f"loss_{name}"] = loss.detach()
    return out | student_diagnostics(targets)


def make_critic_targets(cfg: RCMConfig, student: VelocityNet, batch: Batch, iteration: int) -> CriticTargets:
    """Forward-only half of a critic step: a no-grad student rollout, then x_D."""
    rng = KeyedRNG(cfg.seed, iteration)
    res = _student_rollout(cfg, student, batch, rng, "critic.rollout")
    t_D, eps = _time_and_noise(rng, cfg.p_d.build(), "critic", batch)
    return critic_targets(res.x0, eps, t_D)


def critic_step(
    cfg: RCMConfig, student: VelocityNet, fake_score: VelocityNet, batch: Batch, iteration: int, *,
    loss_normalizer: float | None = None,
) -> dict[str, Tensor]:
    """Accumulate the fake score's gradients (denoising the student's samples)."""
    targets = make_critic_targets(cfg, student, batch, iteration)
    loss = critic_regression(fake_score, targets, batch.context, cond=batch.cond).loss / _normalizer(batch, loss_normalizer)
    with training_pass("fake score backward (critic)"):
        loss.backward()
    return {"loss_critic": loss.detach(), "critic_t_mean": _mean(targets.t_D),
            "critic_valid_frac": _mean(targets.valid)}
