"""Decoded video samples in TensorBoard every ``--log-video-interval`` iterations.

Fixed prompts (``--log-video-context``, else the first logged batch's text embeddings) and fixed
noise (stream 'tensorboard_video' of the run's seed): the live student's 1/2/4-step samples, and
once, at the first log, the teacher's reference (Euler with CFG against the data's negative
prompt). Sampling runs on every rank (the models are sharded over TP/CP, pipelined over PP);
the logging rank alone decodes with the VAE and writes, per model and step count, an animated
video (``videos/...``) and a frame grid (``frames/...``: a row per prompt, frames left to right),
both scaled down to at most ``MAX_WIDTH`` pixels wide.

Memory: the VAE lives on the CPU between logs and visits the GPU only to decode, one sample at a
time (``AutoencoderKLWan`` decodes one latent frame at a time with its causal cache); frames go
to the CPU as uint8 at once and the cache is emptied after. Before decoding, the largest
decoder activation of one latent frame is estimated; when it does not fit the free GPU memory
the decode is skipped with a one-line warning (the run continues). On a CPU run the same check uses
the host's available memory.
"""

from __future__ import annotations

import os
import sys

import torch

from ..rcm import sample
from ..rcm.teacher_sampling import euler_sample
from .reporting import VIDEO_STEPS, VideoLogConfig

TEACHER_SHIFT = 5.0  # tools/generate.py's default flow shift for the teacher grid
MAX_WIDTH = 416  # videos are logged at most this wide (480p's half: GIF encoding and event files stay small)
STREAM = "tensorboard_video"


def load_contexts(path: str, text_len: int) -> torch.Tensor:
    """generate.py's --context-file format -> [N, text_len, D], zero-padded / cut."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    ctx = blob["context"] if isinstance(blob, dict) and "context" in blob else None
    if ctx is None:
        raise ValueError(f"--log-video-context {path}: expected a dict with 'context'")
    embs = list(ctx) if not isinstance(ctx, torch.Tensor) or ctx.dim() == 3 else [ctx]
    out = torch.zeros(len(embs), text_len, embs[0].shape[-1])
    for i, e in enumerate(embs):
        out[i, :min(text_len, e.shape[0])] = e.float()[:text_len]
    return out


def decode_bytes(vae, latent_hw: tuple[int, int]) -> int:
    """Peak bytes of decoding one latent frame: the decoder's widest full-resolution activations
    (base_dim channels, 4 output frames, spatial factor squared pixels per latent pixel), times the
    buffers alive at once (input, output, the causal cache of two frames, norm temporaries)."""
    cfg = vae.config
    factor = 2 ** len(cfg.temperal_downsample)
    pixels = latent_hw[0] * latent_hw[1] * factor * factor
    width = cfg.base_dim * max(cfg.dim_mult[:2])
    return int(8 * width * 4 * pixels * torch.finfo(vae.dtype).bits // 8)


def frame_grid(rows: list[torch.Tensor], max_frames: int = 8, pad: int = 2) -> torch.Tensor:
    """uint8 videos [T,H,W,3] of one size -> uint8 image [H', W', 3]: a row per video, frames subsampled."""
    t = min(r.shape[0] for r in rows)
    idx = torch.linspace(0, t - 1, min(t, max_frames)).round().long().unique().tolist()
    h, w = rows[0].shape[1:3]
    grid = torch.full((len(rows) * (h + pad) + pad, len(idx) * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i, r in enumerate(rows):
        for j, k in enumerate(idx):
            grid[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = r[k]
    return grid


class VideoSampleLogger:
    def __init__(self, cfg: VideoLogConfig, seed: int, is_logging_rank: bool, device: torch.device):
        self.cfg, self.seed, self.is_logging_rank, self.device = cfg, seed, is_logging_rank, device
        self.vae = None
        self.contexts = self.uncond = None
        self.teacher_logged = False

    def due(self, iteration: int) -> bool:
        return bool(self.cfg.interval) and iteration % self.cfg.interval == 0

    def _prompts(self, batch) -> None:
        if self.contexts is not None:
            return
        text_len = batch.context.shape[1]
        if self.cfg.context_file is not None:
            ctx = load_contexts(self.cfg.context_file, text_len)
        else:
            ctx = batch.context.detach().float().cpu()
        self.contexts = ctx[:self.cfg.num_prompts]
        self.uncond = batch.uncond_context[:1].detach().float().cpu()

    @torch.no_grad()
    def log(self, logger, iteration: int, batch, student_net, teacher_net, rcm, autocast) -> None:
        """Sample on every rank (collectives inside the models), decode and write on the logging rank.
        ``teacher_net`` None: no teacher reference (e.g. a pipelined teacher)."""
        self._prompts(batch)
        n, shape = self.contexts.shape[0], batch.latent_shape
        ctx = self.contexts.to(self.device)
        idx = list(range(n))
        samples = {}
        with autocast():
            for steps in VIDEO_STEPS:
                if steps <= len(rcm.sample_mid_times) + 1:
                    samples[f"student_{steps}step"] = sample(
                        student_net, ctx, shape, idx, seed=self.seed, num_steps=steps, mid_times=rcm.sample_mid_times,
                        sigma_max=rcm.sample_sigma_max, stream=STREAM).float().cpu()
            if teacher_net is not None and not self.teacher_logged and self.cfg.teacher_steps:
                noise = sample_noise(self.seed, idx, shape, self.device)
                samples[f"teacher_{self.cfg.teacher_steps}step"] = euler_sample(
                    teacher_net, ctx, self.uncond.to(self.device), shape, idx, seed=self.seed,
                    num_steps=self.cfg.teacher_steps, guidance_scale=rcm.cfg_scale, shift=TEACHER_SHIFT,
                    noise=noise).float().cpu()
                self.teacher_logged = True
        if self.is_logging_rank:
            self._write(logger, iteration, samples)

    def _load_vae(self):
        if self.vae is None:
            from ..data.encoders import WanVAEEncoder

            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.vae = WanVAEEncoder(self.cfg.vae, "cpu", dtype)
        return self.vae

    def _fits(self, vae, latent_hw) -> tuple[bool, int, int]:
        need = decode_bytes(vae.vae, latent_hw)
        if self.device.type == "cuda":  # the VAE's weights move to the GPU for the decode
            need += sum(p.numel() * p.element_size() for p in vae.vae.parameters())
        free = free_memory_bytes(self.device)
        return need <= free, need, free

    def _write(self, logger, iteration: int, samples: dict) -> None:
        vae = self._load_vae()
        ok, need, free = self._fits(vae, next(iter(samples.values())).shape[-2:])
        if not ok:
            where = "GPU memory" if self.device.type == "cuda" else "host memory"
            print(f"warning: video samples at iteration {iteration} skipped: decoding needs ~{need / 2**30:.1f} GiB, "
                  f"{free / 2**30:.1f} GiB of {where} is free", file=sys.stderr, flush=True)
            return
        vae.vae.to(self.device)
        vae.device = self.device
        try:
            for name, latents in samples.items():
                videos = [shrink(decode_video(vae, z), MAX_WIDTH) for z in latents]
                for i, v in enumerate(videos):
                    logger.add_video(f"videos/{name}/prompt{i}", v, iteration, self.cfg.fps)
                logger.add_image(f"frames/{name}", frame_grid(videos).numpy(), iteration)
        finally:
            vae.vae.to("cpu")
            vae.device = torch.device("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def free_memory_bytes(device: torch.device) -> int:
    """What a decode may use: free GPU memory plus what torch's allocator holds unused, or on the
    CPU the host's available memory (MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def sample_noise(seed: int, idx: list[int], shape, device) -> torch.Tensor:
    """The student sampler's starting noise for these prompts (rcm.sampling's stream), for the teacher too."""
    from ..rcm.rng import KeyedRNG

    return KeyedRNG(seed, 0).normal(f"{STREAM}.noise", idx, shape, device=device)


def shrink(frames: torch.Tensor, max_width: int) -> torch.Tensor:
    """uint8 [T,H,W,3] scaled down (area average) to at most ``max_width`` wide, sizes kept even."""
    t, h, w, _ = frames.shape
    if w <= max_width:
        return frames
    size = (max(2, round(h * max_width / w / 2) * 2), max_width)
    x = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=size, mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def decode_video(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents [C,T,H,W] -> uint8 [T', H', W', 3] on the CPU."""
    z = latents.unsqueeze(0).float() * vae.std + vae.mean
    video = vae.vae.decode(z.to(vae.device, vae.dtype)).sample[0]
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().contiguous()
