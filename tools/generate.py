#!/usr/bin/env python
"""Generate videos with a distilled few-step student (and, side by side, the multi-step teacher).

    python tools/generate.py --load runs/wan1.3b/checkpoints --prompt "a red fox runs through snow" \\
        --text-encoder Wan2.1-T2V-1.3B-Diffusers --vae Wan2.1-T2V-1.3B-Diffusers --steps 4 --seed 0 --out samples/
    torchrun --nproc-per-node 2 tools/generate.py --hf-dir student-diffusers --tensor-model-parallel-size 2 \\
        --prompts-file prompts.txt --text-encoder W --vae W --steps 2 --teacher-steps 30 --sampler unipc \\
        --teacher Wan2.1-T2V-14B-Diffusers/transformer --bf16 --out samples/

The student (EMA weights of a training checkpoint by default) samples in ``--steps`` 1..4
steps at TrigFlow times [atan(sigma_max), mid..., 0] (rcm_megatron.rcm.sampling). With
``--teacher-steps N`` the teacher (``--teacher``, default: the teacher recorded in the
checkpoint) samples the same prompts from the same starting noise with Euler or diffusers'
UniPC (classifier-free guidance, Wan's shifted flow). Prompts are encoded with the umT5
encoder (transformers ``UMT5EncoderModel``) and latents decoded with diffusers'
``AutoencoderKLWan``, both from local folders; ``--latents-only`` skips the VAE.

Image-to-video (``--image PATH``, one for every prompt or one per prompt): a Wan2.1 / Wan2.2 I2V
model gets the image as diffusers' ``WanImageToVideoPipeline`` gives it (VAE latents of [image,
zero frames] after a 4-channel first-frame mask; CLIP image embeddings from ``--image-encoder``
for Wan2.1 I2V), a Wan2.2 TI2V model the image's latents as the given first frame. PATH is an
image file (resized and center-cropped to --height x --width) or a ``.pt`` of precomputed fields
(``first_frame`` [C,1,h,w], ``condition``, ``image_embeds``; e.g. the toy I2V task's first latent
frame). The teacher comparison gets the same condition.

Writes to ``--out``: ``latents.pt``, per prompt ``student_K.mp4`` (and ``teacher_K.mp4``)
when PyAV is installed, and ``contact_sheet.png`` (one row per prompt and model, frames
left to right; with --latents-only the first three latent channels). Under torchrun every
rank holds its tensor-parallel shard and its context-parallel chunk of the token sequence
(the model's output is replicated); rank 0 encodes the prompts, decodes and writes.
Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcm_megatron.cli import ArgumentParser, quiet_optional_backends  # noqa: E402

quiet_optional_backends()  # before anything imports megatron-core

import torch  # noqa: E402

from rcm_megatron.eval.png import write_png  # noqa: E402

PROG = "generate.py"
WAN_TEMPORAL, WAN_SPATIAL = 4, 8  # the Wan2.1 VAE's factors when no --vae is given


class UsageError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = p.add_argument_group("student")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="our checkpoint directory (training --save, or an imported model)")
    src.add_argument("--hf-dir", help="diffusers WanTransformer3DModel folder (e.g. an exported student)")
    g.add_argument("--weights", choices=("ema", "student", "model", "fake_score"),
                   help="which weights of --load (default: ema, else the only model)")
    g.add_argument("--iteration", type=int, help="checkpoint iteration (default: latest)")
    g.add_argument("--steps", type=int, default=4, help="student sampling steps, 1..4 (default 4)")
    g.add_argument("--sigma-max", type=float, default=None,
                   help="starting sigma (default: the checkpoint's training setting, else 80; up to 1600 for metrics)")
    g.add_argument("--mid-times", type=float, nargs="+", default=None,
                   help="intermediate TrigFlow times (default: the checkpoint's training setting, else the official "
                        "code's 1.5 1.4 1.0; paper: 1.3 1.0 0.6)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file, one prompt per line")
    g.add_argument("--text-encoder", help="umT5 encoder folder, or a Wan2.1 diffusers pipeline folder")
    g.add_argument("--tokenizer", help="tokenizer folder (default: beside the text encoder)")
    g.add_argument("--context-file", help="instead of a text encoder: a .pt with precomputed embeddings "
                                          "{'context': [N,L,D] or list, 'negative': [L,D] (optional)}")
    g.add_argument("--text-len", type=int, default=None,
                   help="embeddings are zero-padded to this length (default: the checkpoint's data, else Wan's 512)")
    g.add_argument("--negative-prompt", default=None, help="teacher CFG negative prompt (default: Wan's)")
    g = p.add_argument_group("video")
    g.add_argument("--vae", help="AutoencoderKLWan folder, or a Wan2.1 diffusers pipeline folder")
    g.add_argument("--latents-only", action="store_true", help="do not decode (no --vae needed)")
    g.add_argument("--num-frames", type=int, default=None, help="video frames, 4k+1 (default 81)")
    g.add_argument("--height", type=int, default=None, help="default 480")
    g.add_argument("--width", type=int, default=None, help="default 832")
    g.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"),
                   help="latent shape directly (overrides frames/height/width; default with none of them: the "
                        "checkpoint's training data, e.g. the toy task's 4 4 8 8)")
    g.add_argument("--fps", type=int, default=16)
    g.add_argument("--image", action="append", default=[],
                   help="image-to-video: the first frame (an image file, or a .pt of precomputed condition fields); "
                        "once for every prompt or once per prompt")
    g.add_argument("--image-encoder", help="CLIPVisionModel folder (or a Wan2.1 I2V pipeline) for a model with an "
                                           "image branch (Wan2.1 I2V)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=1, help="prompts per forward (results do not depend on it)")
    g.add_argument("--out", "--output", dest="out", default="samples", help="output folder (default samples/)")
    g.add_argument("--sheet-frames", type=int, default=8, help="frames per row of the contact sheet")
    g = p.add_argument_group("teacher comparison")
    g.add_argument("--teacher-steps", type=int, default=0, help="also sample the teacher with N steps (0: off)")
    g.add_argument("--sampler", choices=("euler", "unipc"), default="unipc")
    g.add_argument("--teacher", help="teacher source (default: the teacher recorded in --load's checkpoint)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="teacher CFG scale (default: the checkpoint's training cfg_scale, else Wan's 5)")
    g.add_argument("--shift", type=float, default=5.0, help="flow shift of the teacher grid (Wan: 3 at 480p, 5 at 720p)")
    g.add_argument("--scheduler-config", help="UniPC: a pipeline's scheduler/ folder (default: Wan's settings)")
    g = p.add_argument_group("compute")
    g.add_argument("--bf16", action="store_true", help="DiT in bf16 (norms, modulation, time embedding fp32)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", choices=("a2a", "p2p", "a2a+p2p"), default="p2p",
                   help="a2a: Ulysses (heads/TP divisible by CP), p2p: ring (any CP), a2a+p2p: hierarchical")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs=2, metavar=("A", "B"))
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return p


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def log(msg: str) -> None:
    if _rank() == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- checks
def check_args(args) -> list[str]:
    from rcm_megatron.rcm.sampling import OFFICIAL_MID_TIMES

    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise UsageError(f"--prompts-file {args.prompts_file}: no such file")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    mid = tuple(args.mid_times) if args.mid_times else OFFICIAL_MID_TIMES
    args.mid_times = mid
    if not 1 <= args.steps <= len(mid) + 1:
        raise UsageError(f"--steps {args.steps}: expected 1..{len(mid) + 1} (one more than the --mid-times given)")
    if any(not 0 < t < math.pi / 2 for t in mid) or list(mid) != sorted(mid, reverse=True):
        raise UsageError(f"--mid-times {list(mid)}: expected decreasing TrigFlow times in (0, pi/2)")
    if args.sigma_max <= 0:
        raise UsageError(f"--sigma-max must be > 0, got {args.sigma_max}")
    if args.teacher_steps < 0:
        raise UsageError(f"--teacher-steps must be >= 0, got {args.teacher_steps}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.toy_prompts:
        if prompts or args.text_encoder is not None or args.context_file is not None:
            raise UsageError("the toy model's prompts are its class embeddings: pass no --prompt, --prompts-file, "
                             "--text-encoder or --context-file")
    elif args.context_file is None:
        if not prompts:
            raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
        if args.text_encoder is None:
            raise UsageError("--text-encoder PATH is needed to encode prompts (or pass --context-file with "
                             "precomputed embeddings)")
    elif args.text_encoder is not None:
        raise UsageError("--context-file and --text-encoder are exclusive")
    if not args.latents_only and args.vae is None:
        raise UsageError("--vae PATH is needed to decode videos (or pass --latents-only)")
    if args.text_len < 1:
        raise UsageError(f"--text-len must be >= 1, got {args.text_len}")
    if args.latent_shape is None and (args.num_frames - 1) % 4:
        raise UsageError(f"--num-frames {args.num_frames}: Wan videos have 4k+1 frames (e.g. 81)")
    for flag in ("vae", "text_encoder", "tokenizer", "teacher", "scheduler_config", "image_encoder"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.pipeline_model_parallel_size != 1:
        raise UsageError("--pipeline-model-parallel-size > 1 is not supported for sampling (use tensor parallelism)")
    return prompts


def apply_recorded_settings(args, source) -> None:
    """Fill the flags not given from the checkpoint's recorded training settings, else Wan's defaults;
    the toy model (no text encoder, no VAE) samples its class embeddings and writes latents only."""
    from rcm_megatron.eval.generation_settings import WAN_GUIDANCE, WAN_TEXT_LEN, recorded_settings
    from rcm_megatron.rcm.sampling import OFFICIAL_MID_TIMES

    meta = getattr(getattr(source, "info", None), "meta", None)
    rec = recorded_settings(meta, source.config) if meta else {}
    video_flags = (args.num_frames, args.height, args.width)
    if args.latent_shape is None and all(v is None for v in video_flags) and "latent_shape" in rec:
        args.latent_shape = list(rec["latent_shape"])
    args.num_frames, args.height, args.width = (d if v is None else v for v, d in zip(video_flags, (81, 480, 832)))
    args.text_len = args.text_len or rec.get("text_len", WAN_TEXT_LEN)
    args.guidance_scale = rec.get("guidance_scale", WAN_GUIDANCE) if args.guidance_scale is None else args.guidance_scale
    args.mid_times = args.mid_times or list(rec.get("mid_times", OFFICIAL_MID_TIMES))
    args.sigma_max = rec.get("sigma_max", 80.0) if args.sigma_max is None else args.sigma_max
    given = args.prompt or args.prompts_file or args.text_encoder or args.context_file
    args.toy_prompts = bool(rec.get("toy")) and not given
    if args.toy_prompts and args.vae is None:
        args.latents_only = True
    if rec:
        log(f"settings from the checkpoint's training run: " + ", ".join(
            f"{k} {v}" for k, v in rec.items() if k != "toy") + (" (toy task: class prompts)" if args.toy_prompts else ""))


# ----------------------------------------------------------------------------- text
def encode_prompts(args, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [N, text_len, D], negative [1, text_len, D] or None), on rank 0 then broadcast."""
    import torch.distributed as dist

    result = [None]
    if _rank() == 0:
        if args.toy_prompts:
            from rcm_megatron.eval.generation_settings import toy_contexts

            _, embs, neg = toy_contexts()
            neg = neg[0]
        elif args.context_file is not None:
            blob = torch.load(args.context_file, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or "context" not in blob:
                raise UsageError(f"--context-file {args.context_file}: expected a dict with 'context'")
            ctx = blob["context"]
            embs = list(ctx) if not isinstance(ctx, torch.Tensor) or ctx.dim() == 3 else [ctx]
            neg = blob.get("negative")
        else:
            from rcm_megatron.data.encoders import WAN_NEGATIVE_PROMPT, UMT5TextEncoder

            enc = UMT5TextEncoder(args.text_encoder, args.tokenizer, device=device, max_length=args.text_len)
            texts = prompts + ([args.negative_prompt or WAN_NEGATIVE_PROMPT] if args.teacher_steps else [])
            out = enc.encode(texts)
            embs, neg = out[:len(prompts)], (out[len(prompts)] if args.teacher_steps else None)
            del enc
        result = [(torch.stack([_pad(e, args.text_len) for e in embs]),
                   None if neg is None else _pad(neg, args.text_len).unsqueeze(0))]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def _pad(e: torch.Tensor, length: int) -> torch.Tensor:
    e = e.float()
    if e.dim() != 2:
        raise UsageError(f"text embedding must be [L, D], got {tuple(e.shape)}")
    out = torch.zeros(length, e.shape[1])
    out[:min(length, e.shape[0])] = e[:length]
    return out


# ----------------------------------------------------------------------------- models
def open_student(args):
    from rcm_megatron.checkpointing.loading import open_source

    if args.load is not None:
        if not os.path.exists(args.load):
            raise UsageError(f"--load {args.load}: no such file or directory")
        return open_source(args.load, weights=args.weights, iteration=args.iteration)
    if args.weights is not None or args.iteration is not None:
        raise UsageError("--weights / --iteration select from a --load checkpoint, not from --hf-dir")
    return open_source(args.hf_dir, kind="diffusers")


def teacher_path(args, student_src) -> str:
    if args.teacher is not None:
        return args.teacher
    teacher = (student_src.provenance or {}).get("teacher") or {}
    path = teacher.get("source") if isinstance(teacher, dict) else None
    if not isinstance(path, str) or path == "random-init" or not os.path.exists(path):
        raise UsageError(f"--teacher-steps needs a teacher: pass --teacher PATH (the student's recorded teacher is "
                         f"{path or 'unknown'!r})")
    return path


def load(source, args, device):
    from rcm_megatron.checkpointing.loading import load_model

    return load_model(source, device=device, dtype=torch.bfloat16 if args.bf16 else None)


def autocast(args, device):
    """--bf16: the DiT's weights are bf16 (norms, modulation, time embedding fp32) and its inputs are not,
    so run it under bf16 autocast as the trainer does (without it the patch embedding's conv refuses
    float latents against bf16 weights)."""
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def release_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- image
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_task(cfg, source) -> str | None:
    """'i2v' (condition channels or an image branch), 'ti2v' (a Wan2.2 TI2V model: 48-channel latents,
    or a checkpoint trained with a given first frame) or None (text-to-video)."""
    from rcm_megatron.data.conditions import is_image_model

    if is_image_model(cfg):
        return "i2v"
    data = (getattr(getattr(source, "info", None), "meta", None) or {}).get("data") or {}
    return "ti2v" if cfg.in_channels == 48 or "first_frame" in (data.get("conditions") or ()) else None


def check_image_args(args, cfg, source, num_prompts: int) -> None:
    """--image against the model, before any model is built."""
    from rcm_megatron.data.conditions import describe

    task = image_task(cfg, source)
    if args.image and task is None:
        raise UsageError(f"--image {args.image[0]}: {source.what} is a text-to-video model (in_channels = "
                         f"out_channels = {cfg.in_channels}, no image branch)")
    if task is not None and not args.image:
        raise UsageError(f"--image PATH is needed: {source.what} is an image-to-video model ({describe(cfg)}"
                         + (")" if task == "i2v" else ": Wan2.2 TI2V, the image is its first frame)"))
    if args.toy_prompts:
        from rcm_megatron.eval.generation_settings import toy_contexts

        num_prompts = len(toy_contexts()[0])
    if num_prompts and len(args.image) not in (0, 1, num_prompts):  # --context-file: counted once read
        raise UsageError(f"{len(args.image)} --image for {num_prompts} prompts: give one for all or one per prompt")
    for path in args.image:
        if not os.path.isfile(path):
            raise UsageError(f"--image {path}: no such file")
        if path.endswith(".pt"):
            continue
        if not path.lower().endswith(IMAGE_SUFFIXES):
            raise UsageError(f"--image {path}: expected an image file ({', '.join(IMAGE_SUFFIXES)}) or a .pt of "
                             "condition fields")
        if args.vae is None:
            raise UsageError(f"--image {path}: --vae PATH is needed to encode the image")
        if cfg.image_dim is not None and args.image_encoder is None:
            raise UsageError(f"--image {path}: --image-encoder PATH (CLIP) is needed: the model has an image branch "
                             f"(image_dim {cfg.image_dim})")
    if args.image_encoder is not None and cfg.image_dim is None:
        raise UsageError(f"--image-encoder: {source.what} has no image branch (image_dim None)")


def _image_fields(args, path: str, shape, vae, clip) -> dict:
    """The condition fields of one --image, per sample (no batch dimension)."""
    if path.endswith(".pt"):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or not any(k in blob for k in ("first_frame", "condition")):
            raise UsageError(f"--image {path}: expected a dict with 'first_frame' [C,1,h,w] (and optionally "
                             "'condition', 'image_embeds')")
        return {k: blob[k].float() for k in ("first_frame", "condition", "image_embeds") if k in blob}
    import numpy as np
    from PIL import Image

    from rcm_megatron.data.encoders import image_conditions
    from rcm_megatron.data.video import resize_center_crop

    rgb = torch.from_numpy(np.array(Image.open(path).convert("RGB")))[None]  # uint8 [1, H, W, 3]
    frame = resize_center_crop(rgb, args.height, args.width)  # [3, 1, h, w] in [-1, 1]
    clip_video = torch.cat([frame, torch.zeros(3, (shape[1] - 1) * vae.temporal_factor, *frame.shape[2:])], dim=1)
    out = image_conditions(vae, clip_video)
    if clip is not None:
        out["image_embeds"] = clip.encode(frame[:, 0][None])[0]
    return out


def image_condition(args, cfg, shape, n: int, device):
    """The Conditioning of the n prompts (None without --image), made on rank 0 and broadcast."""
    import torch.distributed as dist

    if not args.image:
        return None
    from rcm_megatron.data.conditions import batch_conditioning, check
    from rcm_megatron.data.toy_i2v import IMAGE_DIM, image_tokens

    if len(args.image) not in (1, n):
        raise UsageError(f"{len(args.image)} --image for {n} prompts: give one for all or one per prompt")
    result = [None]
    if _rank() == 0:
        vae = clip = None
        if any(not p.endswith(".pt") for p in args.image):
            from rcm_megatron.data.encoders import CLIPImageEncoder, WanVAEEncoder

            vae = WanVAEEncoder(args.vae, device=device)
            clip = CLIPImageEncoder(args.image_encoder, device=device) if cfg.image_dim is not None else None
        fields = [_image_fields(args, p, shape, vae, clip) for p in args.image]
        fields = fields * n if len(fields) == 1 else fields
        raw = {k: torch.stack([f[k] for f in fields]) for k in fields[0] if all(k in f for f in fields)}
        if cfg.image_dim == IMAGE_DIM and "image_embeds" not in raw and "first_frame" in raw:
            raw["image_embeds"] = image_tokens(raw["first_frame"])  # the toy I2V task's image tokens
        problem = check(tuple(raw), shape[0], cfg, f"--image {args.image[0]}",
                        condition_width=raw["condition"].shape[1] if "condition" in raw else None,
                        image_dim=raw["image_embeds"].shape[-1] if "image_embeds" in raw else None)
        ff = raw.get("first_frame")
        if problem is None and ff is not None and tuple(ff.shape[1:]) != (shape[0], 1, *shape[2:]):
            problem = f"--image {args.image[0]}: first_frame {tuple(ff.shape[1:])}, expected {(shape[0], 1, *shape[2:])}"
        if problem:
            raise UsageError(problem)
        result = [raw | {"latents": torch.zeros(1, 1, 1, 1, 1).expand(n, *shape)}]  # only its shape is read
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return batch_conditioning(result[0], cfg, device)


def part(cond, idx):
    return None if cond is None else cond.select(torch.as_tensor(idx))


# ----------------------------------------------------------------------------- outputs
def vae_factors(path: str | None) -> tuple[int, int, int | None]:
    """(temporal, spatial, z_dim) from the VAE's config.json (every rank, no weights read)."""
    if path is None:
        return WAN_TEMPORAL, WAN_SPATIAL, None
    import json

    from rcm_megatron.data.encoders import _component

    cfg_path = os.path.join(_component(path, "vae"), "config.json")
    if not os.path.isfile(cfg_path):
        raise UsageError(f"--vae {path}: no config.json (expected an AutoencoderKLWan folder or a pipeline folder)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("_class_name") not in (None, "AutoencoderKLWan"):
        raise UsageError(f"--vae {path}: config.json is for {cfg.get('_class_name')}, expected AutoencoderKLWan")
    down = list(cfg.get("temperal_downsample", [False, True, True]))
    return (int(cfg.get("scale_factor_temporal") or 2 ** sum(down)),
            int(cfg.get("scale_factor_spatial") or 2 ** len(down)), int(cfg.get("z_dim", 16)))


def latent_shape(args, cfg) -> tuple[int, int, int, int]:
    tf, sf, z_dim = vae_factors(args.vae)
    if args.latent_shape is not None:
        shape = tuple(args.latent_shape)
    else:
        if args.height % sf or args.width % sf:
            raise UsageError(f"--height/--width {args.height}x{args.width} must be multiples of the VAE's spatial "
                             f"factor {sf}")
        shape = (cfg.out_channels, (args.num_frames - 1) // tf + 1, args.height // sf, args.width // sf)
    if shape[0] != cfg.out_channels:  # an image model's in_channels also count its condition channels
        raise UsageError(f"latent channels {shape[0]} != the model's "
                         + (f"in_channels {cfg.in_channels}" if cfg.in_channels == cfg.out_channels
                            else f"out_channels {cfg.out_channels}"))
    if z_dim is not None and z_dim != cfg.out_channels:
        raise UsageError(f"--vae has z_dim {z_dim}, the model expects {cfg.out_channels} latent channels")
    for size, p, axis in zip(shape[1:], cfg.patch_size, ("T", "H", "W")):
        if size % p:
            raise UsageError(f"latent {axis}={size} (shape {shape}) is not divisible by the patch size {p}: "
                             "choose --height/--width multiples of 16 (or a matching --latent-shape)")
    return shape


def write_mp4(path: str, frames: torch.Tensor, fps: int) -> bool:
    try:
        import av
    except ImportError:
        return False
    t, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2  # yuv420p needs even sizes
    if (ph, pw) != (h, w):
        frames = torch.nn.functional.pad(frames.permute(0, 3, 1, 2), (0, pw - w, 0, ph - h), mode="replicate") \
            .permute(0, 2, 3, 1).contiguous()
    codec = "libx264"
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - an FFmpeg build without x264
        codec = "mpeg4"
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = pw, ph, "yuv420p"
        for f in frames.numpy():
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return True


# ----------------------------------------------------------------------------- main
def run(args) -> int:
    from rcm_megatron.parallel.config import ParallelConfig
    from rcm_megatron.parallel.initialize import initialize_distributed
    from rcm_megatron.rcm.rng import KeyedRNG
    from rcm_megatron.rcm.sampling import sample
    from rcm_megatron.rcm.teacher_sampling import euler_sample
    from rcm_megatron.rcm.unipc import unipc_sample, wan_unipc_scheduler

    student_src = open_student(args)
    apply_recorded_settings(args, student_src)
    prompts = check_args(args)
    try:
        par = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                             sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size,
                             cp_comm_type=args.cp_comm_type,
                             hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes)
        initialize_distributed(par)
    except ValueError as e:
        raise UsageError(str(e)) from e
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = student_src.config
    tpath = tsrc = None
    if args.teacher_steps:
        from rcm_megatron.checkpointing.loading import open_source

        tpath = teacher_path(args, student_src)
        tsrc = open_source(tpath)  # headers only: checked now, loaded after the student is done
        if tsrc.config.in_channels != cfg.in_channels or tsrc.config.text_dim != cfg.text_dim:
            raise UsageError(f"--teacher {tpath}: in_channels/text_dim {tsrc.config.in_channels}/"
                             f"{tsrc.config.text_dim} differ from the student's {cfg.in_channels}/{cfg.text_dim}")
    from rcm_megatron.parallel.context_parallel import validate_cp
    from rcm_megatron.parallel.tensor_parallel import validate_tp

    validate_tp(cfg, args.tensor_model_parallel_size)
    validate_cp(cfg, args.tensor_model_parallel_size, args.context_parallel_size, args.cp_comm_type,
                args.hierarchical_context_parallel_sizes)
    shape = latent_shape(args, cfg)
    check_image_args(args, cfg, student_src, len(prompts))
    from rcm_megatron.eval.generation_settings import check_memory

    try:
        check_memory(cfg, shape, min(args.batch_size, max(1, len(prompts))),
                     sum(t.nbytes for t in student_src.tensors.values()), device)
    except ValueError as e:
        raise UsageError(str(e)) from e
    context, negative = encode_prompts(args, prompts, device)
    if args.toy_prompts:
        prompts = [f"toy class {c}" for c in range(context.shape[0])]
    if args.context_file is not None:
        prompts = prompts or [f"context {i}" for i in range(context.shape[0])]
        if len(prompts) != context.shape[0]:
            raise UsageError(f"{len(prompts)} prompts for {context.shape[0]} embeddings in --context-file")
    if context.shape[-1] != cfg.text_dim:
        raise UsageError(f"text embeddings have width {context.shape[-1]}, the model's text_dim is {cfg.text_dim} "
                         "(a text encoder of another model?)")
    n = context.shape[0]
    cond = image_condition(args, cfg, shape, n, device)
    log(f"{n} prompt(s), latents {list(shape)}, student {student_src.what}, {args.steps} step(s), "
        f"sigma_max {args.sigma_max}, seed {args.seed}, TP {args.tensor_model_parallel_size}"
        f"{' +SP' if args.sequence_parallel else ''}, CP {args.context_parallel_size} ({args.cp_comm_type})")
    t0 = time.time()
    student = load(student_src, args, device)
    student_src.close()
    log(f"loaded the student in {time.time() - t0:.1f} s")
    batches = [list(range(i, min(n, i + args.batch_size))) for i in range(0, n, args.batch_size)]
    t0 = time.time()
    out = {"prompts": prompts, "latent_shape": list(shape), "seed": args.seed, "steps": args.steps,
           "sigma_max": args.sigma_max, "mid_times": list(args.mid_times)}
    with autocast(args, device):
        out["student"] = torch.cat([
            sample(student, context[idx].to(device), shape, idx, seed=args.seed, num_steps=args.steps,
                   mid_times=args.mid_times, sigma_max=args.sigma_max, cond=part(cond, idx)).cpu()
            for idx in batches])
    log(f"student: {n} sample(s) in {time.time() - t0:.1f} s")
    del student
    release_memory(device)
    if tsrc is not None:
        with tsrc:
            teacher = load(tsrc, args, device)
        neg = negative.to(device) if negative is not None else None
        t0 = time.time()
        res = []
        for idx in batches:
            # the student's starting noise (rcm.sampling draws it from stream 'sample.noise', iteration 0)
            noise = KeyedRNG(args.seed, 0).normal("sample.noise", idx, shape, device=device)
            kw = dict(seed=args.seed, num_steps=args.teacher_steps, guidance_scale=args.guidance_scale,
                      shift=args.shift, noise=noise, cond=part(cond, idx))
            with autocast(args, device):
                if args.sampler == "unipc":
                    sched = wan_unipc_scheduler(args.shift, args.scheduler_config)
                    res.append(unipc_sample(teacher, context[idx].to(device), neg, shape, idx, scheduler=sched,
                                            **kw).cpu())
                else:
                    res.append(euler_sample(teacher, context[idx].to(device), neg, shape, idx, **kw).cpu())
        out["teacher"] = torch.cat(res)
        out["teacher_sampler"] = {"sampler": args.sampler, "steps": args.teacher_steps, "source": tpath,
                                  "guidance_scale": args.guidance_scale, "shift": args.shift}
        log(f"teacher ({args.sampler}, {args.teacher_steps} steps, CFG {args.guidance_scale}): {time.time() - t0:.1f} s")
        del teacher
        release_memory(device)
    if _rank() == 0:
        vae = None
        if not args.latents_only:
            from rcm_megatron.data.encoders import WanVAEEncoder

            vae = WanVAEEncoder(args.vae, device=device)
        write_outputs(args, out, vae)
    return 0


def write_outputs(args, out: dict, vae) -> None:
    from rcm_megatron.training.throughput import latent_grid
    from rcm_megatron.training.video_samples import decode_video, frame_grid

    os.makedirs(args.out, exist_ok=True)
    torch.save(out, os.path.join(args.out, "latents.pt"))
    models = ["student"] + (["teacher"] if "teacher" in out else [])
    written = [os.path.join(args.out, "latents.pt")]
    if args.latents_only:
        rows = [out[m][i:i + 1] for i in range(len(out["prompts"])) for m in models]
        sheet = torch.from_numpy(latent_grid(torch.cat(rows), max_samples=len(rows), max_frames=args.sheet_frames))
        legend = [f"{m} {i}" for i in range(len(out["prompts"])) for m in models]
    else:
        rows, legend, no_av = [], [], False
        for i in range(len(out["prompts"])):
            for m in models:
                video = decode_video(vae, out[m][i])
                rows.append(video)
                legend.append(f"{m} {i}")
                path = os.path.join(args.out, f"{m}_{i}.mp4")
                if write_mp4(path, video, args.fps):
                    written.append(path)
                else:
                    no_av = True
        if no_av:
            print(f"{PROG}: PyAV is not installed (pip install av): no mp4 written; see the contact sheet",
                  file=sys.stderr)
        sheet = frame_grid(rows, args.sheet_frames)
    write_png(os.path.join(args.out, "contact_sheet.png"), sheet)
    written.append(os.path.join(args.out, "contact_sheet.png"))
    print(f"contact sheet rows: {', '.join(f'{k}: {name}' for k, name in enumerate(legend))}")
    for i, p in enumerate(out["prompts"]):
        print(f"prompt {i}: {p}")
    print("wrote " + ", ".join(written), flush=True)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import torch.distributed as dist

    from rcm_megatron.checkpointing.errors import CheckpointError, ConversionError
    from rcm_megatron.parallel.initialize import destroy_distributed

    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        return run(args)
    except (UsageError, ConversionError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if owns_group:
            destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
