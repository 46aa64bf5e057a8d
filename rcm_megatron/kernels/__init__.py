"""Attention with a forward-mode tangent.

``attention`` is the differentiable primal used by with-grad passes; ``attention_with_tangent``
is the no-grad primal+tangent used by the sCM tangent pass. Both dispatch to the fused
Triton kernel on CUDA and to the plain-math reference elsewhere (see ``dispatch.py``).
"""

from .dispatch import attention, attention_with_tangent, attention_backend
from .reference import attention_reference, attention_with_tangent_reference

__all__ = [
    "attention",
    "attention_with_tangent",
    "attention_backend",
    "attention_reference",
    "attention_with_tangent_reference",
]
