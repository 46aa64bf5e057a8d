"""Weight-delta merge: base + scale * (student - teacher), tensor by tensor.

What a distillation changed in a teacher (the delta of its student) applied to another model
of the same architecture: the route by which a Wan2.1 T2V rCM student reaches Wan2.2 (its
delta merged into each A14B expert). ``DeltaSource`` is a ``TensorSource`` (``readers.py``),
so ``export.export_diffusers`` streams it to a diffusers folder one output shard at a time
and no model is ever held in memory. The arithmetic runs in fp32 (fp64 stays fp64).
"""

from __future__ import annotations

import re

import torch

from ..checkpointing.errors import ConversionError
from ..checkpointing.sources import TensorSource, full_shapes


class DeltaSource(TensorSource):
    """``base`` with ``scale * (student - teacher)`` added to every tensor not matched by ``exclude``
    (a regex on our parameter names; those keep the base's values and need not line up)."""

    def __init__(self, base: TensorSource, student: TensorSource, teacher: TensorSource, scale: float = 1.0,
                 exclude: str | None = None):
        self.base, self.student, self.teacher, self.scale = base, student, teacher, float(scale)
        self.exclude = None if exclude is None else re.compile(exclude)
        self.config, self.tensors, self.unexpected = base.config, base.tensors, []
        self.what = f"{base.what} + {self.scale:g} x ({student.what} - {teacher.what})"
        self.provenance = {"base": base.provenance, "student": student.provenance, "teacher": teacher.provenance,
                           "scale": self.scale, "exclude": exclude, "format": "delta-merge"}
        names = list(full_shapes(base.config))  # model order
        self.merged = [n for n in names if not self.excluded(n)]
        self.kept = [n for n in names if self.excluded(n)]

    def excluded(self, name: str) -> bool:
        return self.exclude is not None and self.exclude.search(name) is not None

    def check(self) -> None:
        """Every source matches its architecture; the three line up on every merged name (one line
        naming the first mismatch, in model order)."""
        for src in (self.base, self.student, self.teacher):
            src.check()
        problem = first_mismatch(self.merged, [("base", self.base), ("student", self.student),
                                               ("teacher", self.teacher)])
        if problem:
            raise ConversionError(problem)

    def read_many(self, names) -> dict[str, torch.Tensor]:
        names = list(names)
        out = self.base.read_many(names)
        merged = [n for n in names if not self.excluded(n)]
        if merged:
            s, t = self.student.read_many(merged), self.teacher.read_many(merged)
            for n in merged:
                out[n] = merge_tensor(out[n], s.pop(n), t.pop(n), self.scale)
        return out

    def read(self, name: str) -> torch.Tensor:
        return self.read_many([name])[name]

    def close(self) -> None:
        for src in (self.base, self.student, self.teacher):
            src.close()


def merge_tensor(base: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale (student - teacher) in fp32 at least, returned in the base's dtype."""
    dt = torch.float64 if torch.float64 in (base.dtype, student.dtype, teacher.dtype) else torch.float32
    return (base.to(dt) + scale * (student.to(dt) - teacher.to(dt))).to(base.dtype)


def first_mismatch(names, sources) -> str | None:
    """The first of ``names`` missing from, or of another shape in, one of the named ``sources``."""
    for n in names:
        shapes = [(label, None if n not in src.tensors else tuple(src.tensors[n].shape)) for label, src in sources]
        missing = [label for label, shape in shapes if shape is None]
        if missing:
            return (f"{n} is missing from the {' and '.join(missing)} model (the models must share one "
                    "architecture; --exclude a pattern to keep the base's values for such tensors)")
        if len({shape for _, shape in shapes}) > 1:
            return f"{n} differs in shape: " + ", ".join(f"{label} {shape}" for label, shape in shapes)
    return None


def delta_report(source: DeltaSource, batch: int = 16) -> list[tuple[str, tuple, float]]:
    """(name, shape, ||scale (student - teacher)|| / ||base||) of every merged tensor whose delta is
    not zero, in model order: what a merge would change."""
    rows = []
    for k in range(0, len(source.merged), batch):
        names = source.merged[k:k + batch]
        b, s, t = source.base.read_many(names), source.student.read_many(names), source.teacher.read_many(names)
        for n in names:
            delta = source.scale * (s[n].double() - t[n].double())
            if bool(delta.any()):
                rows.append((n, tuple(b[n].shape), (delta.norm() / b[n].double().norm().clamp_min(1e-30)).item()))
    return rows
