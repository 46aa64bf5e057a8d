#!/usr/bin/env python
"""Prompts -> training latents sampled from the teacher -> webdataset shards.

    python tools/synthesize_data.py --prompts prompts.txt --output data/synth \\
        --teacher-checkpoint Wan2.1-T2V-1.3B-Diffusers/transformer --text-encoder Wan2.1-T2V-1.3B-Diffusers --bf16
    torchrun --nproc-per-node 8 tools/synthesize_data.py ...     # each rank writes its own shards

rCM distills on data; when real videos are scarce, the teacher's own samples serve. Each
prompt (a .txt file with one per line, or a .csv/.jsonl/.json with a caption/text/prompt
column) is embedded with umT5 as Wan does, then ``--samples-per-prompt`` latents are drawn
with the teacher's multi-step sampler (rcm_megatron.rcm.teacher_sampling: Euler on the
rectified flow, CFG ``--guidance-scale`` against ``--negative-prompt``, Wan's ``--shift``).
Sample n = prompt_row * samples_per_prompt + k starts from noise keyed by (--seed, n), so
the output does not depend on the number of ranks or the batch size.

Same shard layout, resume and bad-input rules as tools/prepare_data.py: an empty prompt
is skipped and counted; exit 1 only if nothing valid remains, 2 for configuration errors.

``--task i2v`` (image-to-video) samples an I2V teacher from prompt + image pairs: ``--prompts`` is a
.csv/.tsv/.jsonl/.json manifest with a prompt and an image column (image, image_path, ...;
``--image-column``; relative paths from the manifest's folder). Each image is scaled to cover the
latent size times the VAE's factor and center-cropped, and encoded as tools/prepare_data.py --task i2v
encodes a video's first frame (``data.encoders.first_frame_conditions``: ``--vae`` condition latents +
Wan's mask, ``--image-encoder`` CLIP embeddings when the teacher takes them); the teacher samples the
video conditioned on them (both CFG sides; a teacher without condition channels gets the frame given
at t = 0, as Wan2.2 TI2V); the shards hold the conditions beside the latents in the I2V shard format
the trainer reads. A two-expert folder (Wan2.2 A14B, experts.json) is a teacher too, routed by time.
Every image is opened before any model is built: a missing or unreadable one exits 2 naming it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcm_megatron.cli import ArgumentParser, quiet_optional_backends  # noqa: E402

quiet_optional_backends()  # before anything imports megatron-core

import torch  # noqa: E402

from rcm_megatron.data import conditions  # noqa: E402
from rcm_megatron.data.encoders import (  # noqa: E402
    WAN_NEGATIVE_PROMPT, CLIPImageEncoder, UMT5TextEncoder, WanVAEEncoder, first_frame_conditions, i2v_dataset_meta,
)
from rcm_megatron.data.jobs import Progress, RankInfo, barrier_and_sum, quiet_hub, read_manifest  # noqa: E402
from rcm_megatron.data.shards import (  # noqa: E402
    ShardWriter, _shard_count, check_dataset_meta, shard_complete, shard_name, write_dataset_meta,
    write_negative_context,
)
from rcm_megatron.data.video import VideoError, read_image, resize_center_crop  # noqa: E402
from rcm_megatron.rcm.teacher_sampling import euler_sample  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="synthesize_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line), .csv/.tsv/.jsonl/.json "
                   "(--task i2v: a manifest with prompt and image columns)")
    p.add_argument("--caption-column", default=None)
    p.add_argument("--task", choices=("t2v", "i2v"), default="t2v",
                   help="i2v: sample an image-to-video teacher from prompt + image pairs")
    p.add_argument("--image-column", default=None, help="with --task i2v: the manifest's image column")
    p.add_argument("--vae", default=None, help="with --task i2v: AutoencoderKLWan folder or a Wan diffusers pipeline")
    p.add_argument("--image-encoder", default=None,
                   help="with --task i2v: CLIPVisionModel folder (+ preprocessor_config.json) or a Wan I2V pipeline; "
                        "needed when the teacher takes image embeddings")
    p.add_argument("--output", required=True)
    p.add_argument("--teacher-checkpoint", required=True,
                   help="diffusers WanTransformer3DModel folder or an rcm-megatron model file (.pt)")
    p.add_argument("--text-encoder", required=True, help="UMT5EncoderModel folder or a Wan diffusers pipeline folder")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), default=(16, 21, 60, 104),
                   help="latent shape (default: Wan 81 frames at 480x832)")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1, help="samples per teacher call")
    p.add_argument("--steps", type=int, default=50, help="Euler steps")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=5.0, help="Wan's timestep shift (3 for 480p in diffusers, 5 in Wan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    p.add_argument("--bf16", action="store_true", help="teacher and encoders in bf16")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--latent-dtype", choices=sorted(DTYPES), default="bfloat16", help="stored tensor dtype")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--log-interval", type=float, default=30.0)
    return p


def read_teacher(path: str):
    """(config, weights per network: [one] or [high-noise, low-noise], boundary ratio or None, provenance)
    of a model source or a two-expert folder; nothing is built."""
    from rcm_megatron.checkpointing.expert_source import is_expert_checkpoint, read_expert_source
    from rcm_megatron.checkpointing.loading import read_model_source

    if os.path.isdir(path) and is_expert_checkpoint(path):
        src = read_expert_source(path)
        return src.config, [src.high_noise_weights, src.weights], src.boundary_ratio, src.provenance
    cfg, weights, meta = read_model_source(path)
    return cfg, [weights], None, meta


def build_teacher(cfg, weights: list, boundary, device, bf16: bool):
    from rcm_megatron.models import WanDiT, WanExperts

    nets = []
    for w in weights:
        model = WanDiT(cfg)
        model.load_state_dict(w, strict=True)
        model = model.to(device).eval().requires_grad_(False)
        nets.append(model.to_dtype(torch.bfloat16) if bf16 else model)
    return nets[0] if boundary is None else WanExperts(*nets, boundary).eval()


def check_task(args, cfg) -> str | None:
    """Why --task and the i2v flags do not fit each other or the teacher (its config only), or None."""
    if args.task == "t2v":
        for flag in ("image_column", "vae", "image_encoder"):
            if getattr(args, flag) is not None:
                return f"--{flag.replace('_', '-')} is used only with --task i2v"
        if conditions.is_image_model(cfg):
            return (f"--teacher-checkpoint {args.teacher_checkpoint}: {conditions.describe(cfg)}; sample it with "
                    "--task i2v from prompt + image pairs (--vae, --image-encoder)")
        return None
    if args.vae is None:
        return "--task i2v needs --vae (an AutoencoderKLWan folder, or a Wan diffusers pipeline)"
    if cfg.image_dim is not None and args.image_encoder is None:
        return (f"--teacher-checkpoint {args.teacher_checkpoint}: {conditions.describe(cfg)}; --task i2v needs "
                "--image-encoder (a CLIPVisionModel folder, or a Wan I2V diffusers pipeline)")
    return None


def check_images(items) -> str | None:
    """Open every row's image (before any model is built): the first that cannot be used, or None."""
    for it in items:
        try:
            read_image(it.path)
        except VideoError as e:
            return f"--prompts row {it.row}: image {e}"
    return None


def encode_image(path: str, vae, image, latent_shape) -> dict:
    """The I2V fields of one image as the first frame of a clip of the teacher's size (the VAE's
    factors times the latent size); the other frames are zeros, which the encoding never reads."""
    _, t, h, w = latent_shape
    frame = resize_center_crop(read_image(path), h * vae.spatial_factor, w * vae.spatial_factor)
    clip = torch.cat([frame, frame.new_zeros(3, (t - 1) * vae.temporal_factor, *frame.shape[2:])], dim=1)
    return first_frame_conditions(vae, image, clip)


def fail(msg: str, code: int = 2) -> int:
    print(f"synthesize_data.py: error: {msg}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ranks = RankInfo.from_env()
    err = None
    for flag in ("samples_per_prompt", "samples_per_shard", "batch_size", "steps", "text_len"):
        if getattr(args, flag) < 1:
            err = f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
    if not os.path.exists(args.teacher_checkpoint):
        err = f"--teacher-checkpoint {args.teacher_checkpoint}: no such file or directory"
    for flag in ("text_encoder", "vae", "image_encoder"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            err = f"--{flag.replace('_', '-')} {path}: no such directory"
    items = []
    i2v = args.task == "i2v"
    if err is None:
        try:
            items = read_manifest(args.prompts, caption_column=args.caption_column, need_video=False,
                                  image_column=args.image_column, need_image=i2v)
        except (ValueError, FileNotFoundError) as e:
            err = str(e)
    if err:
        return fail(err)
    if args.limit:
        items = items[: args.limit]
    if i2v and (err := check_images(items)):
        return fail(err)
    quiet_hub()
    device = args.device or ranks.default_device()
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    try:
        cfg, weights, boundary, meta = read_teacher(args.teacher_checkpoint)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        return fail(e)
    if err := check_task(args, cfg):
        return fail(err)
    shape = tuple(args.latent_shape)
    problems = []
    if shape[0] != cfg.out_channels:
        problems.append(f"--latent-shape C={shape[0]}, the teacher expects in_channels={cfg.in_channels}"
                        if cfg.in_channels == cfg.out_channels else
                        f"--latent-shape C={shape[0]}, the teacher generates out_channels={cfg.out_channels}")
    for size, p, axis in zip(shape[1:], cfg.patch_size, "THW"):
        if size % p:
            problems.append(f"--latent-shape {axis}={size} is not divisible by the patch size {p}")
    if problems:
        return fail("; ".join(problems))
    vae = image = None
    try:
        text = UMT5TextEncoder(args.text_encoder, args.tokenizer, device, dtype, args.text_len)
        if i2v:
            vae = WanVAEEncoder(args.vae, device, dtype)
            image = CLIPImageEncoder(args.image_encoder, device, dtype) if args.image_encoder else None
    except (OSError, ValueError) as e:
        return fail(e)
    if text.dim != cfg.text_dim:
        problems.append(f"--text-encoder gives width {text.dim}, the teacher expects text_dim={cfg.text_dim}")
    dataset_meta = {}
    if i2v:
        height, width = shape[2] * vae.spatial_factor, shape[3] * vae.spatial_factor
        dataset_meta = i2v_dataset_meta(vae, image, shape, height, width) | {
            "num_frames": (shape[1] - 1) * vae.temporal_factor + 1, "height": height, "width": width}
        if vae.z_dim != shape[0]:
            problems.append(f"--vae {args.vae} has z_dim {vae.z_dim}, --latent-shape C={shape[0]}")
        else:
            fields = dataset_meta["conditions"]
            why = conditions.check(fields, shape[0], cfg, f"the image conditions of --vae {args.vae}",
                                   condition_width=fields["condition"][0],
                                   image_dim=fields["image_embeds"][-1] if "image_embeds" in fields else None)
            if why:
                problems.append(why)
    if problems:
        return fail("; ".join(problems))
    try:
        teacher = build_teacher(cfg, weights, boundary, device, args.bf16)
    except (RuntimeError, ValueError) as e:
        return fail(e)
    del weights

    spp, per_shard = args.samples_per_prompt, args.samples_per_shard
    num_samples = len(items) * spp
    num_shards = (num_samples + per_shard - 1) // per_shard
    mine = ranks.shards(num_shards)
    progress = Progress("synthesize", ranks, len(mine), args.log_interval)
    progress.info(f"{len(items)} prompts x {spp} = {num_samples} samples -> {num_shards} shards of {per_shard}; "
                  f"this rank: {len(mine)} shards | {args.task} | {args.steps} Euler steps, cfg {args.guidance_scale}, "
                  f"shift {args.shift} | device {device}")
    neg = text.encode([args.negative_prompt])[0]
    dataset_meta = {
        "latent_shape": list(shape), "text_len": args.text_len, "text_dim": text.dim,
        "latent_dtype": args.latent_dtype, "tool": "synthesize_data", "teacher": meta.get("source"),
        "text_encoder": text.source, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "shift": args.shift, "seed": args.seed,
        "samples_per_prompt": spp, "samples_per_shard": per_shard, "prompts": os.path.abspath(args.prompts),
        **dataset_meta}
    try:
        check_dataset_meta(args.output, dataset_meta)  # every rank: never add shards to another dataset
        if ranks.rank == 0:
            write_dataset_meta(args.output, dataset_meta)
    except ValueError as e:
        return fail(e)
    if ranks.rank == 0:
        write_negative_context(args.output, neg, args.negative_prompt)
    uncond = neg.unsqueeze(0).to(device)
    neg_full = torch.zeros(1, args.text_len, text.dim, device=device, dtype=dtype)
    neg_full[0, : uncond.shape[1]] = uncond[0]
    for s in mine:
        path = os.path.join(args.output, shard_name(s))
        if shard_complete(path):
            progress.shard(skipped=True)
            continue
        wanted = []
        for n in range(s * per_shard, min((s + 1) * per_shard, num_samples)):
            it = items[n // spp]
            if not it.text:
                if n % spp == 0:
                    progress.warn(f"skipped prompt row {it.row}: empty prompt")
                progress.sample(False, "empty_prompt")
                continue
            wanted.append((n, it))
        conds = {}  # prompt row -> its image's fields (shared by the row's samples)
        with ShardWriter(path, DTYPES[args.latent_dtype]) as w:
            for k in range(0, len(wanted), args.batch_size):
                chunk = wanted[k:k + args.batch_size]
                embs = text.encode([it.text for _, it in chunk])
                length = max(e.shape[0] for e in embs)
                ctx = torch.zeros(len(chunk), length, text.dim)
                for i, e in enumerate(embs):
                    ctx[i, : e.shape[0]] = e
                ctx = torch.cat([ctx, torch.zeros(len(chunk), args.text_len - length, text.dim)], 1)
                ctx = ctx.to(device, dtype)
                cond = None
                if i2v:
                    for _, it in chunk:
                        if it.row not in conds:
                            conds[it.row] = encode_image(it.path, vae, image, shape)
                    raw = {f: torch.stack([conds[it.row][f] for _, it in chunk]) for f in conds[chunk[0][1].row]}
                    cond = conditions.batch_conditioning(raw, cfg, device)
                x0 = euler_sample(teacher, ctx, neg_full, shape, [n for n, _ in chunk], seed=args.seed,
                                  num_steps=args.steps, guidance_scale=args.guidance_scale, shift=args.shift,
                                  cond=cond)
                for (n, it), z, e in zip(chunk, x0.float().cpu(), embs):
                    if not torch.isfinite(z).all():
                        progress.warn(f"skipped sample {n} (prompt row {it.row}): non-finite latents")
                        progress.sample(False, "non_finite")
                        continue
                    info = {"sample": n, "prompt_row": it.row, "seed": args.seed}
                    w.write(f"s{n:09d}", z, e, it.text, info | ({"image": it.path} if i2v else {}),
                            conditions=conds.get(it.row))
                    progress.sample(True)
        progress.shard()
    if not mine:
        progress.line()
    written = sum(_shard_count(os.path.join(args.output, shard_name(s)))[0] for s in mine
                  if shard_complete(os.path.join(args.output, shard_name(s))))
    total, = barrier_and_sum([written], ranks)
    if ranks.rank == 0:
        progress.info(f"done: the dataset holds {total} samples in {args.output}")
    if total == 0:
        return fail(f"no valid sample from --prompts {args.prompts} (all prompts empty?)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
