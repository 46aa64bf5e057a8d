"""Which model an iteration trains (docs/design.md §2.6).

rcm: iterations < tangent_warmup_iters are student steps with sCM only (the fake score is
not needed yet). Afterwards, with F = student_update_freq and k = iteration - warmup, the
student steps (sCM + DMD) when k % F == F - 1 and the critic steps otherwise: F - 1 critic
steps come first, so the fake score (a copy of the teacher) has tracked the warmed-up
student before the first DMD gradient.
dmd: the same alternation with DMD only (no warmup). scm / dcm: every iteration is a
student step with that loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RCMConfig


@dataclass(frozen=True)
class Phase:
    """model: 'student' or 'critic'; losses: student loss terms this step, subset of scm/dmd/dcm."""

    model: str
    losses: tuple[str, ...] = ()

    @property
    def is_student(self) -> bool:
        return self.model == "student"


CRITIC = Phase("critic")


def phase(cfg: RCMConfig, iteration: int) -> Phase:
    if iteration < 0:
        raise ValueError(f"iteration: expected >= 0, got {iteration}")
    if cfg.method in ("scm", "dcm"):
        return Phase("student", (cfg.method,))
    warmup = cfg.tangent_warmup_iters if cfg.method == "rcm" else 0
    if iteration < warmup:
        return Phase("student", ("scm",))
    f = cfg.student_update_freq
    if (iteration - warmup) % f != f - 1:
        return CRITIC
    return Phase("student", ("scm", "dmd") if cfg.method == "rcm" else ("dmd",))


def tangent_warmup_ratio(cfg: RCMConfig, iteration: int) -> float:
    """r = min(1, iteration / tangent_warmup_iters), 1 without warmup."""
    if cfg.tangent_warmup_iters == 0:
        return 1.0
    return min(1.0, iteration / cfg.tangent_warmup_iters)
