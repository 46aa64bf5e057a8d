"""Launch configurations for the attention-with-tangent kernel, cached without sequence lengths.

Why this exists: a public Triton JVP attention kernel autotunes with the sequence lengths in its
key, so every new video resolution stalls training for 50-80 s. Here the key is only

    (GPU model, padded head dim, dtype, whether K/V tangents are present)

and sequence lengths are runtime arguments of the kernel (never ``constexpr`` and never
specialised), so a new length reuses both the config and the compiled binary.

Where a config comes from, first match wins:
1. ``set_config`` / ``tune_attention`` in this process, or a JSON file loaded with
   ``load_tuning`` (``RCM_ATTN_TUNING_FILE`` is loaded automatically on first use);
2. the measured table ``_MEASURED`` (H100 numbers from benchmarks/attention_jvp.py);
3. a heuristic by compute capability and shared memory.

Tuning is never implicit unless ``RCM_ATTN_AUTOTUNE=1``; then the first call per key (not per
length) runs ``tune_attention`` on its own arguments, once.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class AttnConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    tma: bool = False  # K/V tiles through tensor descriptors (Hopper TMA) instead of pointers

    def as_dict(self) -> dict:
        return asdict(self)


_lock = threading.Lock()
_cache: dict[str, AttnConfig] = {}
_env_loaded = False

# Measured on H100 80GB HBM3 (benchmarks/results/attention_jvp_*run2.json, sweep over
# candidate_configs at 12 heads x 32760 tokens and 32760 x 512 cross-attention, torch 2.11,
# triton 3.6); see docs/performance.md. Keys use the same string form as ``config_key``.
_MEASURED: dict[str, AttnConfig] = {
    "NVIDIA H100 80GB HBM3|d128|bfloat16|kvt": AttnConfig(128, 64, 8, 2, True),
    "NVIDIA H100 80GB HBM3|d128|bfloat16|q_only": AttnConfig(64, 64, 4, 2, True),
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def device_name(device: torch.device | None = None) -> str:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return "interpreter"
    return torch.cuda.get_device_name(device)


def config_key(dev_name: str, block_d: int, dtype: torch.dtype, has_kv_tangent: bool) -> str:
    return f"{dev_name}|d{block_d}|{_dtype_name(dtype)}|{'kvt' if has_kv_tangent else 'q_only'}"


def _heuristic(dev_name: str, block_d: int, dtype: torch.dtype, has_kv_tangent: bool,
               capability: tuple[int, int] | None) -> AttnConfig:
    if dev_name == "interpreter":
        return AttnConfig(32, 32, 4, 1)
    if dtype == torch.float32:
        # fp32 is a test path (exact "ieee" dots), not a speed path: keep shared memory small.
        return AttnConfig(64, 32, 4, 2) if block_d <= 64 else AttnConfig(32, 32, 4, 2)
    major = capability[0] if capability else 8
    if major >= 9:
        # Measured on H100 (benchmarks/results/attention_jvp_*run1.json): full tangents like
        # BLOCK_M 128 / 8 warps (K/V tiles are reused by 128 rows: half the L2 traffic of 64),
        # zero-KV tangents like BLOCK_M 64 / 4 warps with <= 100 KB shared memory, so two
        # programs share an SM and overlap each other's softmax with MMA. K/V through TMA.
        if block_d <= 64:
            return AttnConfig(64, 64, 4, 2, True)
        return AttnConfig(128, 64, 8, 2, True) if has_kv_tangent else AttnConfig(64, 64, 4, 2, True)
    if major == 8:
        if block_d <= 64:
            return AttnConfig(128, 64, 4, 2)
        return AttnConfig(128, 32, 8, 2)
    return AttnConfig(64, 32, 4, 1)


def _maybe_load_env() -> None:
    global _env_loaded
    if _env_loaded:
        return
    _env_loaded = True
    path = os.environ.get("RCM_ATTN_TUNING_FILE")
    if path and os.path.exists(path):
        load_tuning(path)


def get_config(device: torch.device | None, block_d: int, dtype: torch.dtype,
               has_kv_tangent: bool) -> AttnConfig:
    """The launch config for this key (no sequence length in it)."""
    _maybe_load_env()
    name = device_name(device)
    key = config_key(name, block_d, dtype, has_kv_tangent)
    with _lock:
        cfg = _cache.get(key)
    if cfg is not None:
        return cfg
    cfg = _MEASURED.get(key)
    if cfg is None:
        cap = None
        if name != "interpreter":
            cap = torch.cuda.get_device_capability(device)
        cfg = _heuristic(name, block_d, dtype, has_kv_tangent, cap)
    with _lock:
        _cache.setdefault(key, cfg)
    return cfg


def set_config(device, block_d: int, dtype: torch.dtype, has_kv_tangent: bool,
               cfg: AttnConfig | dict) -> None:
    if isinstance(cfg, dict):
        cfg = AttnConfig(**cfg)
    key = config_key(device_name(device), block_d, dtype, has_kv_tangent)
    with _lock:
        _cache[key] = cfg


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def save_tuning(path: str) -> None:
    """Write every config chosen or tuned in this process to ``path`` (JSON)."""
    with _lock:
        data = {k: v.as_dict() for k, v in sorted(_cache.items())}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load_tuning(path: str) -> int:
    """Load configs saved by ``save_tuning``; returns how many were read."""
    with open(path) as f:
        data = json.load(f)
    fields = set(AttnConfig.__dataclass_fields__)
    with _lock:
        for k, v in data.items():  # fields this version does not know are ignored
            _cache[k] = AttnConfig(**{n: x for n, x in v.items() if n in fields})
    return len(data)


def candidate_configs(block_d: int, dtype: torch.dtype, has_kv_tangent: bool) -> list[AttnConfig]:
    """The search space of ``tune_attention`` on Hopper-class GPUs (seconds, not minutes)."""
    C = AttnConfig
    if dtype == torch.float32:
        return [C(32, 32, 4, 2), C(64, 32, 4, 2)]
    if block_d <= 64:
        return [C(64, 64, 4, 2, True), C(64, 64, 4, 3, True), C(128, 64, 8, 2, True), C(128, 64, 8, 3, True),
                C(64, 64, 4, 2)]
    if has_kv_tangent:
        return [C(128, 64, 8, 2, True), C(128, 32, 8, 3, True), C(64, 32, 4, 2, True), C(128, 64, 8, 2)]
    return [C(64, 64, 4, 2, True), C(64, 32, 4, 3, True), C(128, 64, 8, 3, True), C(64, 64, 4, 2)]


def tune_attention(q, k, v, q_tan, k_tan=None, v_tan=None, softmax_scale=None, candidates=None,
                   verbose: bool = False) -> AttnConfig:
    """Time candidate configs on these arguments and cache the fastest for their key.

    The sequence lengths of the arguments only choose the workload that is timed; the result
    applies to every length with the same (GPU, head dim, dtype, KV-tangent) key.
    """
    import triton.testing

    from .triton_attention import _block_d, triton_attention_with_tangent

    has_kv_tan = k_tan is not None or v_tan is not None
    block_d = _block_d(q.shape[-1])
    cands = candidates or candidate_configs(block_d, q.dtype, has_kv_tan)
    best, best_ms = None, float("inf")
    for cfg in cands:
        try:
            fn = lambda: triton_attention_with_tangent(q, k, v, q_tan, k_tan, v_tan, softmax_scale,  # noqa: E731
                                                       config=cfg)
            fn()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
        except Exception as e:  # out of shared memory / registers for this shape
            if verbose:
                print(f"tune: {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        if verbose:
            print(f"tune: {cfg} {ms:.3f} ms")
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("no attention config compiled for this shape")
    set_config(q.device, block_d, q.dtype, has_kv_tan, best)
    return best
