"""What a training checkpoint holds, byte by byte, and how long writing it took.

``state_bytes`` walks a sharded state dict (what ``CheckpointManager.save`` is given) and sums
the tensors this rank writes (replica id 0) per component: ``student``, ``ema``,
``fake_score``, and per optimizer its fp32 main parameters (``opt_student/param``, megatron-core's
distributed optimizer only) and AdamW moments (``/exp_avg``, ``/exp_avg_sq``). The frozen teacher
is never part of it (it is reloaded from ``--teacher-checkpoint``).

``expected_bytes`` is the same breakdown from the parameter count alone, per backend: with
``--use-distributed-optimizer --bf16`` (the shipped Wan configs) a parameter costs 2 (bf16 student)
+ 4 (fp32 EMA) + 12 (fp32 main + two moments) bytes, and 2 + 12 more for the fake score: 32 bytes,
45.4 GB for Wan-1.3B's 1.419 B parameters. That is what Megatron-LM writes for one model too (the
bf16 weights and the optimizer's fp32 copy), once per trained model, plus the EMA.

``SaveReport``: the seconds of each phase of one save and the bytes written, one line for the log.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

OPT_KINDS = ("exp_avg_sq", "exp_avg", "param")  # longest first: "exp_avg" is a prefix of "exp_avg_sq"


def _kind(key: str) -> str | None:
    parts = key.split(".")
    for kind in OPT_KINDS:
        if kind in parts or f"{kind}s" in parts:
            return kind
    return None


def _component(top: str, key: str) -> str:
    if top.startswith("opt_"):
        kind = _kind(key)
        return f"{top}/{kind}" if kind else top
    return top


def _is_written_here(sh) -> bool:
    rid = sh.replica_id
    return all(r == 0 for r in rid) if isinstance(rid, (tuple, list)) else rid == 0


def state_bytes(sharded_state_dict: dict) -> dict[str, int]:
    """{component: bytes of tensor data this rank writes}, 'other' for non-tensor state (a pickled
    estimate is not made: meta, step counts and RNG are kilobytes)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    out: dict[str, int] = {}
    for top, sub in sharded_state_dict.items():
        values = nested_values(sub) if isinstance(sub, (dict, list)) else [sub]
        for v in values:
            if isinstance(v, ShardedTensor) and _is_written_here(v):
                name = _component(top, v.key)
                out[name] = out.get(name, 0) + v.data.numel() * v.data.element_size()
    return out


def expected_bytes(num_params: int, backend: str, bf16: bool, fake_score: bool = True) -> dict[str, int]:
    """``state_bytes`` of a single-rank checkpoint from the parameter count. ``backend``: 'local'
    (torch AdamW on the module's parameters: fp32 weights and moments; bf16 is autocast) or
    'megatron' (megatron-core's distributed optimizer: bf16 weights under --bf16, fp32 main
    parameters and moments)."""
    if backend == "megatron":
        w = 2 if bf16 else 4
        opt = {"param": 4, "exp_avg": 4, "exp_avg_sq": 4}
    elif backend in ("local", "fsdp"):
        w, opt = 4, {"exp_avg": 4, "exp_avg_sq": 4}
    else:
        raise ValueError(f"unknown backend {backend!r}")
    out = {"student": w * num_params, "ema": 4 * num_params}
    out.update({f"opt_student/{k}": b * num_params for k, b in opt.items()})
    if fake_score:
        out["fake_score"] = w * num_params
        out.update({f"opt_fake_score/{k}": b * num_params for k, b in opt.items()})
    return out


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, f)))


@dataclass
class SaveReport:
    """One save: seconds per phase (in order), bytes on disk, the time training was blocked."""

    iteration: int
    started: float = field(default_factory=time.perf_counter)
    phases: dict = field(default_factory=dict)
    bytes: int = 0
    blocking_s: float | None = None
    total_s: float | None = None

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def timed(self, phase: str):
        report = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                report.add(phase, time.perf_counter() - self.t0)

        return _Timer()

    def line(self) -> str:
        """'45.40 GB in 52.3 s (0.87 GB/s; plan 1.2 s, write 48.0 s, ...)'."""
        total = self.total_s or 0.0
        rate = self.bytes / 1e9 / total if total > 0 else float("nan")
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        blocked = f", training blocked {self.blocking_s:.1f} s" if self.blocking_s is not None and \
            self.blocking_s < total - 0.05 else ""
        return f"{self.bytes / 1e9:.2f} GB in {total:.1f} s ({rate:.2f} GB/s; {parts}{blocked})"
