"""When the DiT blocks run under regional ``torch.compile`` (``--compile-blocks``).

One rule, read by the trainer (``model_building.compile_wanted``) and by the memory planner
(compiled blocks fuse the elementwise work, so their no-grad passes hold fewer temporaries).
``auto`` (the default) compiles on CUDA unless collectives run inside the blocks (TP, CP: their
hand-written autograd functions would split the graph at every exchange; FSDP2's per-block
parameter gathers) or selective recompute is on (its op policy runs in eager code). Measured on one H100 at Wan-1.3B 480p: 407 model
TFLOP/s per schedule period compiled, where the eager path ran out of memory at the same
micro-batch (docs/performance.md).
"""

from __future__ import annotations

COMPILE_SETTINGS = ("auto", "on", "off")


def blocks_compiled(setting: str, device: str, tensor_parallel: int, context_parallel: int,
                    recompute_granularity: str | None, parameter_sharding: bool = False) -> bool:
    """Whether ``--compile-blocks SETTING`` compiles the blocks of a run on ``device`` at these sizes."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"--compile-blocks must be one of {COMPILE_SETTINGS}, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    return (str(device).startswith("cuda") and tensor_parallel == 1 and context_parallel == 1
            and not parameter_sharding and recompute_granularity != "selective")
