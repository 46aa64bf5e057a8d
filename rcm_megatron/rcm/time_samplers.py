"""Training-time distributions over TrigFlow t (docs/design.md §2.2).

Both are defined on the RF time s and mapped by t = atan(s/(1-s)):
- LogNormal(m, sd): log sigma ~ N(m, sd), s = sigma/(1+sigma), so t = atan(sigma).
- UniformShift(k): u ~ U(0,1), s = k u/(1 + (k-1) u) (Wan's timestep shift).

Clamp: t is clipped to [T_MIN, T_MAX] = [1e-4, pi/2 - 1e-4]. The low end keeps sin t away
from 0, where the critic weight 1/sin^2 t and (cos t x_t - x0)/sin t blow up; the high end
keeps s < 1 (s/(1-s) finite) and cos t > 0. For the Wan presets both tails carry
probability < 1e-7, so the distributions are unchanged in practice.

Draws come from ``rng.KeyedRNG`` so they are layout invariant; the deterministic maps
``from_normal`` / ``from_uniform`` are exposed for tests and for inverse-CDF use.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .rng import Indices, KeyedRNG
from .trigflow import rf_to_trig, wan_time_shift

T_MIN = 1e-4
T_MAX = math.pi / 2 - 1e-4


def _clamp(t: Tensor) -> Tensor:
    return t.clamp(T_MIN, T_MAX)


@dataclass(frozen=True)
class LogNormal:
    """log sigma ~ N(mean, std); t = atan(sigma)."""

    mean: float
    std: float

    def __post_init__(self):
        if not math.isfinite(self.mean):
            raise ValueError(f"LogNormal.mean: expected a finite float, got {self.mean!r}")
        if not (self.std > 0 and math.isfinite(self.std)):
            raise ValueError(f"LogNormal.std: expected a finite float > 0, got {self.std!r}")

    def from_normal(self, z: Tensor) -> Tensor:
        return _clamp(torch.atan(torch.exp(self.mean + self.std * z.to(torch.float64))))

    def sample(self, rng: KeyedRNG, stream: str, indices: Indices, shape=()) -> Tensor:
        """t [B, *shape] float64."""
        return self.from_normal(rng.normal(stream, indices, shape))


@dataclass(frozen=True)
class UniformShift:
    """u ~ U(0,1), s = k u/(1+(k-1)u); t = atan(s/(1-s))."""

    shift: float

    def __post_init__(self):
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"UniformShift.shift: expected a finite float > 0, got {self.shift!r}")

    def from_uniform(self, u: Tensor) -> Tensor:
        u = u.to(torch.float64)
        return _clamp(rf_to_trig(wan_time_shift(u, self.shift)))

    def sample(self, rng: KeyedRNG, stream: str, indices: Indices, shape=()) -> Tensor:
        return self.from_uniform(rng.uniform(stream, indices, shape))


TimeSampler = LogNormal | UniformShift

_SAMPLERS = {"lognormal": (LogNormal, 2), "uniform_shift": (UniformShift, 1)}


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name and positional parameters, e.g. SamplerSpec("lognormal", (0.7, 1.6))."""

    name: str
    params: tuple[float, ...]

    def __post_init__(self):
        if self.name not in _SAMPLERS:
            raise ValueError(f"SamplerSpec.name: expected one of {sorted(_SAMPLERS)}, got {self.name!r}")
        object.__setattr__(self, "params", tuple(float(p) for p in self.params))
        n = _SAMPLERS[self.name][1]
        if len(self.params) != n:
            raise ValueError(f"SamplerSpec.params: {self.name} expects {n} parameter(s), got {self.params!r}")
        self.build()  # parameter validation lives in the sampler classes

    def build(self) -> TimeSampler:
        return _SAMPLERS[self.name][0](*self.params)

    @classmethod
    def parse(cls, text: str) -> SamplerSpec:
        """'lognormal(0.7,1.6)' or 'uniform_shift(5)' (command-line form)."""
        m = re.fullmatch(r"\s*([a-z_]+)\s*\(([^)]*)\)\s*", text)
        if not m:
            raise ValueError(f"SamplerSpec: expected 'name(p1,...)', got {text!r}")
        params = tuple(float(p) for p in m.group(2).split(",") if p.strip())
        return cls(m.group(1), params)

    def __str__(self) -> str:
        return f"{self.name}({','.join(repr(p) for p in self.params)})"


WAN_1_3B_P_G = SamplerSpec("lognormal", (0.7, 1.6))
WAN_14B_P_G = SamplerSpec("lognormal", (1.5, 1.6))
WAN_P_D = SamplerSpec("uniform_shift", (5.0,))
