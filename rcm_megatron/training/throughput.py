"""Model FLOPs, throughput, MFU, memory and latent previews for logging.

**Counting** (matmul FLOPs, 2 per multiply-add; norms, RoPE, softmax and elementwise work
are not counted, as in Megatron's model-FLOPs convention). A Wan DiT forward of one sample
with S video tokens (T/pt * H/ph * W/pw), L text tokens, width D, FFN width F, N blocks:

    patch embed      2 S (C_in pt ph pw) D
    text embed       2 L (text_dim D + D^2)                  (depends on the prompt only)
    time embed       2 (freq_dim D + D^2 + 6 D^2)
    per block        self-attn q,k,v,o 8 S D^2 + QK^T, PV 4 S^2 D
                     cross-attn q,o 4 S D^2 + k,v on text 4 L D^2 + QK^T, PV 4 S L D
                     FFN 4 S D F
    head             2 S D (C_out pt ph pw)

(equal to ``torch.utils.flop_counter`` on ``WanDiT``; tests/test_throughput.py checks it).
Passes of an rCM iteration, per sample, with f a forward and a backward counted as 2f:

    tangent pass     2x token linears (primal + tangent GEMM), 1x text linears (no tangent),
                     2x time MLP, 3x self-attention (6 matmul units), 2x cross-attention
                     (tK = tV = 0: 4 units)                  ~ 2f-2.2f at long sequences
    with-grad pass   forward + backward = 3f
    student (rcm)    sCM: teacher CFG 2f + tangent + 3f;  DMD: rollout N f (no grad) +
                     fake score f + teacher CFG 2f + last rollout step again with grad 3f
    critic           rollout N f + 3f
    dcm              teacher CFG 2f + student target f + 3f
    teacher mode     flow matching 3f
N is the mean rollout length: (max + 1) / 2 for random lengths, max otherwise. These are
model FLOPs: activation recomputation is not counted, so MFU is comparable across layouts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS_BF16 = {
    "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "GH200": 989.4,
    "H800": 989.4, "H20": 148.0, "B200": 2250.0, "GB200": 2500.0, "B100": 1750.0, "A100": 312.0,
    "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
}


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one Wan DiT forward of one sample, by kind of work."""

    token_linear: float  # patch embed, q/k/v/o, cross q/o, FFN, head (scale with S)
    text_linear: float  # text embedding MLP and cross-attention k/v projections (scale with L)
    time_linear: float  # time embedding MLP and its 6-way projection
    self_attention: float  # QK^T and PV of self-attention
    cross_attention: float  # QK^T and PV of cross-attention

    @property
    def total(self) -> float:
        return self.token_linear + self.text_linear + self.time_linear + self.self_attention + self.cross_attention

    @property
    def tangent(self) -> float:
        """The no-grad forward-with-tangent pass (module docstring)."""
        return (2 * self.token_linear + self.text_linear + 2 * self.time_linear + 3 * self.self_attention
                + 2 * self.cross_attention)


def num_tokens(cfg, latent_shape) -> int:
    """Video tokens of a latent [C, T, H, W] (or [B, C, T, H, W]) after patchify."""
    t, h, w = latent_shape[-3:]
    pt, ph, pw = cfg.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def wan_forward_flops(cfg, tokens: int, text_len: int = 512) -> ForwardFlops:
    """Matmul FLOPs of one forward of a Wan DiT (``WanConfig``) at ``tokens`` video tokens."""
    s, l, d, f, n = int(tokens), int(text_len), cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    pv = cfg.patch_volume
    token_linear = 2 * s * cfg.in_channels * pv * d + n * (8 * s * d * d + 4 * s * d * d + 4 * s * d * f) \
        + 2 * s * d * cfg.out_channels * pv
    text_linear = 2 * l * (cfg.text_dim * d + d * d) + n * 4 * l * d * d
    time_linear = 2 * (cfg.freq_dim * d + d * d + 6 * d * d)
    return ForwardFlops(float(token_linear), float(text_linear), float(time_linear), float(n * 4 * s * s * d),
                        float(n * 4 * s * l * d))


def mean_rollout_steps(max_steps: int, random_steps: bool = True) -> float:
    return (max_steps + 1) / 2 if random_steps else float(max_steps)


def phase_flops(cfg, tokens: int, text_len: int, phase, rollout_max_steps: int = 4,
                rollout_random_steps: bool = True) -> dict[str, float]:
    """Per-sample model FLOPs of one iteration, by pass, plus ``total``.

    ``phase``: an ``rcm.schedule.Phase`` (its ``model`` and ``losses``), or "critic",
    "teacher" (flow-matching pretraining), or a tuple of student loss names ("scm", "dmd", "dcm").
    """
    fw = wan_forward_flops(cfg, tokens, text_len)
    f = fw.total
    n = mean_rollout_steps(rollout_max_steps, rollout_random_steps)
    if isinstance(phase, str):
        model, losses = (phase, ()) if phase in ("critic", "teacher") else ("student", (phase,))
    elif isinstance(phase, tuple):
        model, losses = "student", phase
    else:
        model, losses = phase.model, tuple(phase.losses)
    out: dict[str, float] = {}
    if model == "teacher":
        out["flow_matching_grad"] = 3 * f
    elif model == "critic":
        out["critic_rollout"] = n * f
        out["critic_grad"] = 3 * f
    elif model == "student":
        if "scm" in losses:
            out["scm_teacher_cfg"] = 2 * f
            out["scm_tangent"] = fw.tangent
            out["scm_grad"] = 3 * f
        if "dmd" in losses:
            out["dmd_rollout"] = n * f
            out["dmd_fake_score"] = f
            out["dmd_teacher_cfg"] = 2 * f
            out["dmd_grad"] = 3 * f
        if "dcm" in losses:
            out["dcm_teacher_cfg"] = 2 * f
            out["dcm_target"] = f
            out["dcm_grad"] = 3 * f
        unknown = set(losses) - {"scm", "dmd", "dcm"}
        if unknown or not losses:
            raise ValueError(f"phase losses {losses}: expected a non-empty subset of scm, dmd, dcm")
    else:
        raise ValueError(f"phase {phase!r}: expected student, critic or teacher")
    out["total"] = sum(out.values())
    return out


def average_iteration_flops(cfg, tokens: int, text_len: int, rcm_cfg) -> float:
    """Per-sample FLOPs averaged over one period of the schedule after warmup (for planning):
    rcm/dmd: one student step and F-1 critic steps; scm/dcm: a student step."""
    from ..rcm.schedule import phase as schedule_phase

    warm = rcm_cfg.tangent_warmup_iters if rcm_cfg.method == "rcm" else 0
    period = rcm_cfg.student_update_freq if rcm_cfg.method in ("rcm", "dmd") else 1
    total = sum(phase_flops(cfg, tokens, text_len, schedule_phase(rcm_cfg, warm + k), rcm_cfg.rollout_max_steps,
                            rcm_cfg.rollout_random_steps)["total"] for k in range(period))
    return total / period


# ----------------------------------------------------------------------------- rates
def peak_tflops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak of a GPU by name (``torch.cuda.get_device_name()`` by default); None if unknown."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    if "GH200" in name:
        return PEAK_TFLOPS_BF16["GH200"]
    if "H200" in name:
        return PEAK_TFLOPS_BF16["H200"]
    if "H100" in name:
        if "PCIE" in name:
            return PEAK_TFLOPS_BF16["H100 PCIe"]
        if "NVL" in name:
            return PEAK_TFLOPS_BF16["H100 NVL"]
        return PEAK_TFLOPS_BF16["H100 SXM"]
    for key in ("GB200", "B200", "B100", "H800", "H20", "A100", "A800", "L40S", "A10G"):
        if key in name:
            return PEAK_TFLOPS_BF16[key]
    if re.search(r"\bL4\b", name):
        return PEAK_TFLOPS_BF16["L4"]
    return None


def throughput_metrics(flops: float, seconds: float, num_gpus: int, tokens: float | None = None,
                       peak: float | None = None) -> dict[str, float]:
    """Rates of an iteration that did ``flops`` model FLOPs (all GPUs together) in ``seconds``:
    ``model_tflops_per_gpu``, ``mfu`` (when the peak is known or given, TFLOP/s) and
    ``tokens_per_sec`` (when ``tokens``, the video tokens of the global batch, is given)."""
    seconds = max(float(seconds), 1e-12)
    out = {"model_tflops_per_gpu": flops / seconds / max(1, num_gpus) / 1e12}
    if tokens is not None:
        out["tokens_per_sec"] = float(tokens) / seconds
    peak = peak if peak is not None else peak_tflops()
    if peak:
        out["mfu"] = out["model_tflops_per_gpu"] / peak
    return out


def memory_metrics(device=None, reset: bool = False) -> dict[str, float]:
    """CUDA memory in GiB: ``mem_allocated_gib``, ``mem_peak_allocated_gib``, ``mem_peak_reserved_gib``
    since the last reset (``reset=True`` starts a new window). On CPU: the process's peak RSS."""
    gib = 1024 ** 3
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        out = {"mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
               "mem_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
               "mem_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return out
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return {"mem_peak_rss_gib": rss / (gib if sys.platform == "darwin" else 1024 ** 2)}
    except (ImportError, OSError):
        return {}


# ----------------------------------------------------------------------------- previews
def latent_grid(latents: torch.Tensor, max_samples: int = 4, max_frames: int = 8, channels: int = 3,
                scale: int = 4, pad: int = 2):
    """Latents [B, C, T, H, W] -> a uint8 HWC numpy image for ``MetricsLogger.add_image``: one row
    per sample, one column per frame (evenly subsampled to ``max_frames``), the first
    ``channels`` (3) channels as RGB (1 channel: gray), each sample normalized to its own
    0.5-99.5 percentile range, upscaled ``scale``x (nearest), ``pad`` white pixels between tiles."""
    if latents.dim() != 5:
        raise ValueError(f"latents: expected [B, C, T, H, W], got {tuple(latents.shape)}")
    x = latents.detach()[:max_samples].float().cpu()
    b, c, t, h, w = x.shape
    k = min(channels, c)
    x = x[:, :k]
    if k < 3:
        x = x[:, :1].expand(b, 3, t, h, w) if k == 1 else torch.cat([x, x[:, :1]], 1)[:, :3]
    frames = torch.linspace(0, t - 1, min(t, max_frames)).round().long().unique()
    x = x[:, :, frames]
    flat = x.reshape(b, -1)
    lo = torch.quantile(flat, 0.005, dim=1).view(b, 1, 1, 1, 1)
    hi = torch.quantile(flat, 0.995, dim=1).view(b, 1, 1, 1, 1)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    x = torch.nan_to_num(x, nan=0.0)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    nf, th, tw = x.shape[2], x.shape[3], x.shape[4]
    grid = torch.ones(3, b * th + (b - 1) * pad, nf * tw + (nf - 1) * pad)
    for i in range(b):
        for j in range(nf):
            grid[:, i * (th + pad):i * (th + pad) + th, j * (tw + pad):j * (tw + pad) + tw] = x[i, :, j]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def format_flops(flops: float) -> str:
    units = ["", "K", "M", "G", "T", "P", "E"]
    k = min(len(units) - 1, int(math.log10(max(flops, 1)) // 3))
    return f"{flops / 10 ** (3 * k):.3g} {units[k]}FLOP"
