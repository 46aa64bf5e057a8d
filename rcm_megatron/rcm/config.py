"""One validated config for the method (docs/design.md §2); presets for Wan 1.3B / 14B.

Every check names the field and what it expects, so a bad flag fails at startup, not
hours into a run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .time_samplers import WAN_1_3B_P_G, WAN_14B_P_G, WAN_P_D, SamplerSpec

MODES = ("rcm", "scm", "dmd", "dcm")
TANGENT_WARMUP_FORMS = ("f9b7be9", "pre-f9b7be9")  # see losses.tangent_g
HALF_PI = math.pi / 2


def _fail(name: str, expected: str, value) -> None:
    raise ValueError(f"RCMConfig.{name}: expected {expected}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class RCMConfig:
    """rCM hyper-parameters. Defaults = Wan2.1 1.3B (official code where paper and code differ),
    except tangent_warmup_iters (0 here; the wan presets carry the official recipes' warmup).

    method: 'rcm' (sCM + DMD, critic alternation), 'scm' (sCM only, no fake score),
      'dmd' (DMD only, critic alternation), 'dcm' (discrete-time CM baseline, see losses.py).
    seed: keys every random draw together with iteration and global sample index.
    cfg_scale: teacher guidance w in F_T = F_u + w (F_c - F_u).
    student_update_freq: F; after warmup one student step every F iterations, critic between.
    tangent_warmup_iters: r = min(1, iter/warmup) in the sCM tangent; student-only meanwhile
      (method rcm; ignored by dmd/dcm).
    tangent_warmup_form: how r enters the sCM tangent g (losses.tangent_g): 'f9b7be9' (official
      code since NVlabs/rcm commit f9b7be9, r scales only the x_t term) or 'pre-f9b7be9' (r scales dF too).
    scm_loss_scale / dmd_loss_scale / dcm_loss_scale: per-term multipliers.
    scm_g_norm_eps: g <- g/(||g|| + eps) per sample.
    dmd_weight_clip: lower clip of the DMD weight mean|G - x0_T|.
    p_g: sCM time sampler; p_d: DMD / critic / rollout time sampler.
    rollout_max_steps: student rollout N in 1..max (random per sample if rollout_random_steps,
      else always max). rollout_fixed_times: intermediate times of the rollout (>= max-1
      values, non-increasing in (0, pi/2)); None draws them from p_d, sorted non-increasing.
    ema_sigma_rel: power-EMA relative width (0.1 official code, 0.05 paper).
    lr_student / lr_fake_score / adam_betas / adam_eps / weight_decay: AdamW;
      grad_clip_norm None = no clipping.
    sample_mid_times / sample_sigma_max: few-step sampler times [atan(sigma_max)] + mid[:N-1] + [0].
    dcm_num_steps / dcm_skip / dcm_shift: dCM grid size, teacher-step skip, grid shift.
    """

    method: str = "rcm"
    seed: int = 0
    cfg_scale: float = 5.0
    student_update_freq: int = 5
    tangent_warmup_iters: int = 0
    tangent_warmup_form: str = "f9b7be9"
    scm_loss_scale: float = 100.0
    dmd_loss_scale: float = 1.0
    dcm_loss_scale: float = 1.0
    scm_g_norm_eps: float = 0.1
    dmd_weight_clip: float = 1e-5
    p_g: SamplerSpec = WAN_1_3B_P_G
    p_d: SamplerSpec = WAN_P_D
    rollout_max_steps: int = 4
    rollout_random_steps: bool = True
    rollout_fixed_times: tuple[float, ...] | None = None
    ema_sigma_rel: float = 0.1
    lr_student: float = 2e-6
    lr_fake_score: float = 4e-7
    adam_betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip_norm: float | None = None
    sample_mid_times: tuple[float, ...] = (1.5, 1.4, 1.0)
    sample_sigma_max: float = 80.0
    dcm_num_steps: int = 50
    dcm_skip: int = 1
    dcm_shift: float = 5.0

    def __post_init__(self):
        if self.method not in MODES:
            _fail("method", f"one of {MODES}", self.method)
        if not _is_int(self.seed):
            _fail("seed", "an int", self.seed)
        for name in ("cfg_scale", "scm_loss_scale", "dmd_loss_scale", "dcm_loss_scale", "weight_decay"):
            v = getattr(self, name)
            if not (_is_num(v) and v >= 0):
                _fail(name, "a finite number >= 0", v)
        for name in ("scm_g_norm_eps", "dmd_weight_clip", "lr_student", "lr_fake_score", "adam_eps", "dcm_shift"):
            v = getattr(self, name)
            if not (_is_num(v) and v > 0):
                _fail(name, "a finite number > 0", v)
        if not (_is_int(self.student_update_freq) and self.student_update_freq >= 1):
            _fail("student_update_freq", "an int >= 1", self.student_update_freq)
        if not (_is_int(self.tangent_warmup_iters) and self.tangent_warmup_iters >= 0):
            _fail("tangent_warmup_iters", "an int >= 0", self.tangent_warmup_iters)
        if self.tangent_warmup_form not in TANGENT_WARMUP_FORMS:
            _fail("tangent_warmup_form", f"one of {TANGENT_WARMUP_FORMS}", self.tangent_warmup_form)
        for name in ("p_g", "p_d"):
            v = getattr(self, name)
            if isinstance(v, str):
                try:
                    setattr(self, name, SamplerSpec.parse(v))
                except ValueError as e:
                    _fail(name, f"a valid sampler 'name(params)' ({e})", v)
            elif not isinstance(v, SamplerSpec):
                _fail(name, "a SamplerSpec or 'name(params)' string", v)
        if not (_is_int(self.rollout_max_steps) and 1 <= self.rollout_max_steps <= 8):
            _fail("rollout_max_steps", "an int in 1..8", self.rollout_max_steps)
        if not isinstance(self.rollout_random_steps, bool):
            _fail("rollout_random_steps", "a bool", self.rollout_random_steps)
        if self.rollout_fixed_times is not None:
            self.rollout_fixed_times = self._times("rollout_fixed_times", self.rollout_fixed_times)
            if len(self.rollout_fixed_times) < self.rollout_max_steps - 1:
                _fail("rollout_fixed_times", f"at least rollout_max_steps - 1 = {self.rollout_max_steps - 1} times",
                      self.rollout_fixed_times)
        self.sample_mid_times = self._times("sample_mid_times", self.sample_mid_times)
        if not (_is_num(self.ema_sigma_rel) and 0 < self.ema_sigma_rel < 12 ** -0.5):
            _fail("ema_sigma_rel", "a number in (0, 0.2887) (power EMA with gamma > 0)", self.ema_sigma_rel)
        betas = tuple(self.adam_betas)
        if not (len(betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in betas)):
            _fail("adam_betas", "two numbers in [0, 1)", self.adam_betas)
        self.adam_betas = betas
        if self.grad_clip_norm is not None and not (_is_num(self.grad_clip_norm) and self.grad_clip_norm > 0):
            _fail("grad_clip_norm", "None (no clipping) or a number > 0", self.grad_clip_norm)
        if not (_is_num(self.sample_sigma_max) and self.sample_sigma_max > 0):
            _fail("sample_sigma_max", "a finite number > 0", self.sample_sigma_max)
        if not (_is_int(self.dcm_num_steps) and self.dcm_num_steps >= 1):
            _fail("dcm_num_steps", "an int >= 1", self.dcm_num_steps)
        if not (_is_int(self.dcm_skip) and 1 <= self.dcm_skip <= self.dcm_num_steps):
            _fail("dcm_skip", f"an int in 1..dcm_num_steps ({self.dcm_num_steps})", self.dcm_skip)

    @staticmethod
    def _times(name: str, times) -> tuple[float, ...]:
        try:
            times = tuple(float(x) for x in times)
        except (TypeError, ValueError):
            _fail(name, "a sequence of numbers", times)
        if not all(0 < x < HALF_PI for x in times):
            _fail(name, "times in (0, pi/2)", times)
        if any(b > a for a, b in zip(times, times[1:])):
            _fail(name, "non-increasing times", times)
        return times

    @property
    def uses_fake_score(self) -> bool:
        return self.method in ("rcm", "dmd")

    @classmethod
    def preset(cls, name: str, **overrides) -> RCMConfig:
        """'wan-1.3b' or 'wan-14b', with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"RCMConfig.preset: expected one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> RCMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-friendly (samplers as 'name(params)' strings, tuples as lists); from_dict inverts it."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, SamplerSpec) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RCMConfig:
        if "mode" in d and "method" not in d:  # written before the field was renamed (checkpoint meta)
            d = {("method" if k == "mode" else k): v for k, v in d.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"RCMConfig: unknown field(s) {unknown}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # tangent_warmup_iters: the official recipes (NVlabs/rcm rcm/configs/experiments/rcm/wan2pt1_t2v.py,
    # `tangent_warmup`): 1000 for Wan2.1 T2V 1.3B, 300 for 14B.
    "wan-1.3b": dict(p_g=WAN_1_3B_P_G, p_d=WAN_P_D, student_update_freq=5, lr_student=2e-6, lr_fake_score=4e-7,
                     tangent_warmup_iters=1000),
    "wan-14b": dict(p_g=WAN_14B_P_G, p_d=WAN_P_D, student_update_freq=10, lr_student=1e-6, lr_fake_score=1e-7,
                    tangent_warmup_iters=300),
}
