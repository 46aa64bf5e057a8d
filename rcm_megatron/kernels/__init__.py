"""Attention with a forward-mode tangent.

``attention`` is the differentiable primal used by with-grad passes; ``attention_with_tangent``
is the no-grad primal+tangent used by the sCM tangent pass. Both dispatch to the fused
Triton kernel on CUDA and to the plain-math reference elsewhere (see ``dispatch.py``).
``merge_attention_chunks`` / ``merge_attention_pair`` combine partial results over key chunks
(context-parallel ring attention) with the lse/lse_tan rule of docs/design.md §4.3;
``chunk_attention`` is the with-grad ring's attention of one key chunk, forward and backward
(docs/design.md §4.4). ``numerics`` holds the accumulate dtype and the default softmax scale.
"""

from .dispatch import attention, attention_with_tangent, attention_backend
from .merge import finalize_attention_merge, merge_attention_chunks, merge_attention_pair
from .reference import attention_reference, attention_with_tangent_reference

__all__ = [
    "attention",
    "attention_with_tangent",
    "attention_backend",
    "attention_reference",
    "attention_with_tangent_reference",
    "merge_attention_chunks",
    "merge_attention_pair",
    "finalize_attention_merge",
]
