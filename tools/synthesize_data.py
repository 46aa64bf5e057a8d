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
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcm_megatron.cli import ArgumentParser, quiet_optional_backends  # noqa: E402

quiet_optional_backends()  # before anything imports megatron-core

import torch  # noqa: E402

from rcm_megatron.data.encoders import WAN_NEGATIVE_PROMPT, UMT5TextEncoder  # noqa: E402
from rcm_megatron.data.jobs import Progress, RankInfo, barrier_and_sum, quiet_hub, read_manifest  # noqa: E402
from rcm_megatron.data.shards import (  # noqa: E402
    ShardWriter, _shard_count, check_dataset_meta, shard_complete, shard_name, write_dataset_meta,
    write_negative_context,
)
from rcm_megatron.rcm.teacher_sampling import euler_sample  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="synthesize_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line), .csv/.tsv/.jsonl/.json")
    p.add_argument("--caption-column", default=None)
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
    p.add_argument("--bf16", action="store_true", help="teacher and text encoder in bf16")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--latent-dtype", choices=sorted(DTYPES), default="bfloat16", help="stored tensor dtype")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--log-interval", type=float, default=30.0)
    return p


def load_teacher(path: str, device, bf16: bool):
    from rcm_megatron.checkpointing.loading import read_model_source
    from rcm_megatron.models import WanDiT

    cfg, weights, meta = read_model_source(path)
    model = WanDiT(cfg)
    model.load_state_dict(weights, strict=True)
    model = model.to(device).eval().requires_grad_(False)
    if bf16:
        model.to_dtype(torch.bfloat16)
    return model, cfg, meta


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ranks = RankInfo.from_env()
    err = None
    for flag in ("samples_per_prompt", "samples_per_shard", "batch_size", "steps", "text_len"):
        if getattr(args, flag) < 1:
            err = f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
    if not os.path.exists(args.teacher_checkpoint):
        err = f"--teacher-checkpoint {args.teacher_checkpoint}: no such file or directory"
    if not os.path.isdir(args.text_encoder):
        err = f"--text-encoder {args.text_encoder}: no such directory"
    items = []
    if err is None:
        try:
            items = read_manifest(args.prompts, caption_column=args.caption_column, need_video=False)
        except (ValueError, FileNotFoundError) as e:
            err = str(e)
    if err:
        print(f"synthesize_data.py: error: {err}", file=sys.stderr)
        return 2
    if args.limit:
        items = items[: args.limit]
    quiet_hub()
    device = args.device or ranks.default_device()
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    try:
        teacher, cfg, meta = load_teacher(args.teacher_checkpoint, device, args.bf16)
        text = UMT5TextEncoder(args.text_encoder, args.tokenizer, device, dtype, args.text_len)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"synthesize_data.py: error: {e}", file=sys.stderr)
        return 2
    shape = tuple(args.latent_shape)
    problems = []
    if text.dim != cfg.text_dim:
        problems.append(f"--text-encoder gives width {text.dim}, the teacher expects text_dim={cfg.text_dim}")
    from rcm_megatron.data.conditions import describe, is_image_model

    if is_image_model(cfg):  # prompt + image pairs are not read here yet
        problems.append(f"--teacher-checkpoint {args.teacher_checkpoint}: {describe(cfg)}; synthesize_data.py samples "
                        "text-to-video teachers only")
    elif shape[0] != cfg.in_channels:
        problems.append(f"--latent-shape C={shape[0]}, the teacher expects in_channels={cfg.in_channels}")
    for size, p, axis in zip(shape[1:], cfg.patch_size, "THW"):
        if size % p:
            problems.append(f"--latent-shape {axis}={size} is not divisible by the patch size {p}")
    if problems:
        print(f"synthesize_data.py: error: {'; '.join(problems)}", file=sys.stderr)
        return 2

    spp, per_shard = args.samples_per_prompt, args.samples_per_shard
    num_samples = len(items) * spp
    num_shards = (num_samples + per_shard - 1) // per_shard
    mine = ranks.shards(num_shards)
    progress = Progress("synthesize", ranks, len(mine), args.log_interval)
    progress.info(f"{len(items)} prompts x {spp} = {num_samples} samples -> {num_shards} shards of {per_shard}; "
                  f"this rank: {len(mine)} shards | {args.steps} Euler steps, cfg {args.guidance_scale}, "
                  f"shift {args.shift} | device {device}")
    neg = text.encode([args.negative_prompt])[0]
    dataset_meta = {
        "latent_shape": list(shape), "text_len": args.text_len, "text_dim": text.dim,
        "latent_dtype": args.latent_dtype, "tool": "synthesize_data", "teacher": meta.get("source"),
        "text_encoder": text.source, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "shift": args.shift, "seed": args.seed,
        "samples_per_prompt": spp, "samples_per_shard": per_shard, "prompts": os.path.abspath(args.prompts)}
    try:
        check_dataset_meta(args.output, dataset_meta)  # every rank: never add shards to another dataset
        if ranks.rank == 0:
            write_dataset_meta(args.output, dataset_meta)
    except ValueError as e:
        print(f"synthesize_data.py: error: {e}", file=sys.stderr)
        return 2
    if ranks.rank == 0:
        write_negative_context(args.output, neg, args.negative_prompt)
    uncond = neg.unsqueeze(0).to(device)
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
                neg_full = torch.zeros(1, args.text_len, text.dim, device=device, dtype=dtype)
                neg_full[0, : uncond.shape[1]] = uncond[0]
                x0 = euler_sample(teacher, ctx, neg_full, shape, [n for n, _ in chunk], seed=args.seed,
                                  num_steps=args.steps, guidance_scale=args.guidance_scale, shift=args.shift)
                for (n, it), z, e in zip(chunk, x0.float().cpu(), embs):
                    if not torch.isfinite(z).all():
                        progress.warn(f"skipped sample {n} (prompt row {it.row}): non-finite latents")
                        progress.sample(False, "non_finite")
                        continue
                    w.write(f"s{n:09d}", z, e, it.text, {"sample": n, "prompt_row": it.row, "seed": args.seed})
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
        print(f"synthesize_data.py: error: no valid sample from --prompts {args.prompts} (all prompts empty?)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
