#!/usr/bin/env python
"""Videos + captions -> webdataset shards of Wan2.1 latents and umT5 prompt embeddings.

    python tools/prepare_data.py --input videos.csv --output data/shards \\
        --vae Wan2.1-T2V-1.3B-Diffusers --text-encoder Wan2.1-T2V-1.3B-Diffusers
    torchrun --nproc-per-node 8 tools/prepare_data.py ...        # each rank writes its own shards

Input: a CSV/TSV/JSONL/JSON manifest (a video column: video/path/file..., a caption column:
caption/text/prompt...; relative paths from the manifest's folder) or a directory of
videos with a ``.txt`` caption beside each. Per video: decode (DALI on GPU when installed,
else PyAV; ``--decoder``), take ``--num-frames`` (4k+1) frames from the start at ``--fps``,
scale to cover ``--height`` x ``--width`` and center-crop, encode with the Wan VAE
(normalized latents); captions through umT5 (512 tokens, Wan's text path). Writes
``shard-NNNNNN.tar`` (``--samples-per-shard`` input rows each, minus skipped ones),
``meta.json`` and ``negative_context.pth`` (``--negative-prompt``, Wan's by default).

Resumable: a shard is written under a temporary name and renamed when complete; a rerun
skips complete shards. A video that cannot be read, is too short, or has no caption is
skipped, counted and warned about; the run fails (exit 1, naming the input) only when the
output holds no valid sample at all. Configuration errors exit 2 before any model loads.

``--task i2v`` (image-to-video) also stores, per clip conditioned on its first frame, what
diffusers' Wan I2V pipelines feed the DiT (``rcm_megatron/data/conditions.py``): the first frame's
latents (Wan2.2 TI2V), Wan's mask + condition latents (Wan2.1 / Wan2.2 I2V) and the CLIP image
embeddings of the first frame (``--image-encoder``: a ``CLIPVisionModel`` folder with its
``CLIPImageProcessor``, or a Wan I2V diffusers pipeline folder).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcm_megatron.cli import ArgumentParser, quiet_optional_backends  # noqa: E402

quiet_optional_backends()  # before anything imports megatron-core

import torch  # noqa: E402

from rcm_megatron.data.encoders import (  # noqa: E402
    WAN_NEGATIVE_PROMPT, CLIPImageEncoder, UMT5TextEncoder, WanVAEEncoder, first_frame_conditions, i2v_dataset_meta,
)
from rcm_megatron.data.jobs import Progress, RankInfo, barrier_and_sum, quiet_hub, read_manifest  # noqa: E402
from rcm_megatron.data.shards import (  # noqa: E402
    ShardWriter, _shard_count, check_dataset_meta, shard_complete, shard_name, write_dataset_meta,
    write_negative_context,
)
from rcm_megatron.data.video import (  # noqa: E402
    BACKENDS, TooFewFrames, VideoError, check_frame_count, pick_backend, read_video, resize_center_crop,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="manifest (.csv/.tsv/.jsonl/.json) or a directory of videos + .txt")
    p.add_argument("--output", required=True, help="dataset directory (shards, meta.json, negative_context.pth)")
    p.add_argument("--vae", required=True, help="AutoencoderKLWan folder, or a Wan diffusers pipeline folder (uses vae/)")
    p.add_argument("--text-encoder", required=True,
                   help="UMT5EncoderModel folder, or a Wan diffusers pipeline folder (uses text_encoder/, tokenizer/)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: beside the text encoder)")
    p.add_argument("--task", choices=("t2v", "i2v"), default="t2v",
                   help="i2v: also store the first frame's condition latents, mask and CLIP embeddings")
    p.add_argument("--image-encoder", default=None,
                   help="with --task i2v: CLIPVisionModel folder (+ preprocessor_config.json), or a Wan I2V pipeline")
    p.add_argument("--video-column", default=None)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--num-frames", type=int, default=81, help="frames per clip, 4k+1 (Wan: 81)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--fps", type=float, default=16.0, help="target frame rate (0: keep the source's frames)")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--text-len", type=int, default=512, help="umT5 max tokens (Wan: 512)")
    p.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    p.add_argument("--decoder", choices=BACKENDS, default="auto", help="auto: DALI on GPU if installed, else PyAV")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="encoder compute dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--latent-dtype", choices=sorted(DTYPES), default="bfloat16", help="stored tensor dtype")
    p.add_argument("--sample-posterior", action="store_true", help="sample the VAE posterior (default: its mean)")
    p.add_argument("--text-batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="use only the first N input rows")
    p.add_argument("--log-interval", type=float, default=30.0, help="seconds between progress lines")
    return p


class ConfigError(ValueError):
    pass


def check_args(args) -> None:
    for flag in ("samples_per_shard", "height", "width", "text_len", "text_batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.fps < 0:
        raise ConfigError(f"--fps must be >= 0, got {args.fps}")
    if args.task == "i2v" and args.image_encoder is None:
        raise ConfigError("--task i2v needs --image-encoder (a CLIPVisionModel folder, or a Wan I2V diffusers pipeline)")
    if args.task != "i2v" and args.image_encoder is not None:
        raise ConfigError("--image-encoder is used only with --task i2v")
    for flag in ("vae", "text_encoder", "tokenizer", "image_encoder"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such directory")
    if not os.path.exists(args.input):
        raise ConfigError(f"--input {args.input}: no such file or directory")


def encode_shard(items, vae, text, args, backend, device, progress, image=None) -> list[tuple]:
    """[(item, latents [C,T,H,W], context [L,D], conditions)] of the usable items (conditions: the
    image-to-video fields with ``image``, the CLIP encoder, else None); the rest are counted."""
    videos = []
    for it in items:
        if not it.text:
            progress.warn(f"skipped row {it.row} {it.path}: missing caption")
            progress.sample(False, "no_caption")
            continue
        try:
            frames = read_video(it.path, args.num_frames, args.fps or None, backend, device)
            clip = resize_center_crop(frames.to(device), args.height, args.width)
        except TooFewFrames as e:
            progress.warn(f"skipped row {it.row}: too few frames: {e}")
            progress.sample(False, "too_short")
            continue
        except VideoError as e:
            progress.warn(f"skipped row {it.row}: unreadable: {e}")
            progress.sample(False, "unreadable")
            continue
        z = vae.encode(clip.unsqueeze(0), sample=args.sample_posterior)[0].cpu()
        if not torch.isfinite(z).all():
            progress.warn(f"skipped row {it.row} {it.path}: non-finite latents")
            progress.sample(False, "non_finite")
            continue
        conds = first_frame_conditions(vae, image, clip) if image is not None else None
        videos.append((it, z, conds))
    out = []
    for k in range(0, len(videos), args.text_batch_size):
        chunk = videos[k:k + args.text_batch_size]
        ctxs = text.encode([it.text for it, _, _ in chunk])
        for (it, z, conds), ctx in zip(chunk, ctxs):
            out.append((it, z, ctx, conds))
            progress.sample(True)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ranks = RankInfo.from_env()
    try:
        check_args(args)
        check_frame_count(args.num_frames)
        items = read_manifest(args.input, args.video_column, args.caption_column, need_video=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    if args.limit:
        items = items[: args.limit]
    quiet_hub()
    device = args.device or ranks.default_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    backend = pick_backend(args.decoder, device)
    num_shards = (len(items) + args.samples_per_shard - 1) // args.samples_per_shard
    mine = ranks.shards(num_shards)
    progress = Progress("prepare", ranks, len(mine), args.log_interval)
    progress.info(f"{len(items)} input rows -> {num_shards} shards of {args.samples_per_shard}; this rank: "
                  f"{len(mine)} shards | decoder {backend} | device {device} | {args.num_frames} frames "
                  f"{args.height}x{args.width} at {args.fps or 'source'} fps")
    todo = [s for s in mine if not shard_complete(os.path.join(args.output, shard_name(s)))]
    for _ in range(len(mine) - len(todo)):
        progress.shard(skipped=True)
    try:
        vae = WanVAEEncoder(args.vae, device, dtype)
        check_frame_count(args.num_frames, vae.temporal_factor)
        latent_shape = vae.latent_shape(args.num_frames, args.height, args.width)
        text = UMT5TextEncoder(args.text_encoder, args.tokenizer, device, dtype, args.text_len)
        image = CLIPImageEncoder(args.image_encoder, device, dtype) if args.task == "i2v" else None
    except (OSError, ValueError) as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    dataset_meta = {
        "latent_shape": latent_shape, "text_len": args.text_len, "text_dim": text.dim,
        "latent_dtype": args.latent_dtype, "num_frames": args.num_frames, "height": args.height,
        "width": args.width, "fps": args.fps, "vae": vae.source, "text_encoder": text.source,
        "negative_prompt": args.negative_prompt, "tool": "prepare_data", "input": os.path.abspath(args.input),
        "samples_per_shard": args.samples_per_shard, "sample_posterior": args.sample_posterior}
    if image is not None:
        dataset_meta |= i2v_dataset_meta(vae, image, latent_shape, args.height, args.width)
    try:
        check_dataset_meta(args.output, dataset_meta)  # every rank: never add shards to another dataset
        if ranks.rank == 0:
            write_dataset_meta(args.output, dataset_meta)
    except ValueError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    if ranks.rank == 0:
        write_negative_context(args.output, text.encode([args.negative_prompt])[0], args.negative_prompt)
    progress.info(f"latent shape {list(latent_shape)}, text dim {text.dim}; {len(todo)} shards to write")
    for s in todo:
        chunk = items[s * args.samples_per_shard:(s + 1) * args.samples_per_shard]
        encoded = encode_shard(chunk, vae, text, args, backend, device, progress, image)
        with ShardWriter(os.path.join(args.output, shard_name(s)), DTYPES[args.latent_dtype]) as w:
            for it, z, ctx, conds in encoded:
                w.write(f"r{it.row:09d}", z, ctx, it.text,
                        {"row": it.row, "source": it.path, "num_frames": args.num_frames, "fps": args.fps,
                         "height": args.height, "width": args.width}, conditions=conds)
        progress.shard()
    if not mine:
        progress.line()
    written = sum(_shard_count(os.path.join(args.output, shard_name(s)))[0] for s in mine
                  if shard_complete(os.path.join(args.output, shard_name(s))))
    total, bad = barrier_and_sum([written, sum(progress.bad.values())], ranks)
    if ranks.rank == 0:
        progress.info(f"done: the dataset holds {total} samples ({bad} inputs skipped in this run) in {args.output}")
    if total == 0:
        print(f"prepare_data.py: error: no valid sample in --input {args.input}: all {len(items)} rows were skipped "
              "(see the warnings above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
