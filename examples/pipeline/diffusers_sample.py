#!/usr/bin/env python
"""The exported student in diffusers' ``WanPipeline`` with rCM's few-step scheduler.

    python examples/pipeline/diffusers_sample.py --transformer student-diffusers --pipeline Wan2.1-T2V-1.3B-Diffusers \\
        --scheduler-out student-diffusers-scheduler --context-file ctx.pt --steps 1 2 4 --seed 0 \\
        --latent-shape 16 21 60 104 --bf16 --out diffusers_latents.pt

Writes the scheduler (``RCMFlowMatchScheduler`` with ``--sigma-max`` / ``--mid-times``) to
``--scheduler-out`` and loads it back from there, as a user would ship it beside the transformer.
The pipeline starts from tools/generate.py's noise for ``--seed`` (stream 'sample.noise', scaled
to the pipeline's flow time by ``initial_latents``) and re-noises with its keyed streams
(``use_keyed_noise``), so for the same weights and prompt embeddings both give the same latents.
Prompts: ``--context-file`` (generate.py's format: {'context': [N,L,D] or a list of [L_i,D]},
zero-padded to ``--text-len``) and/or ``--prompt`` texts, encoded by the pipeline's own umT5.
The text prompts are sampled at the last ``--steps`` only; ``--decode``: also as mp4s decoded by
the pipeline's VAE. Output: {'context': {steps: latents}, 'prompt': {steps: latents}, settings}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusers_sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--transformer", required=True, help="exported WanTransformer3DModel folder")
    p.add_argument("--pipeline", required=True, help="folder with vae/, text_encoder/, tokenizer/ (a Wan pipeline)")
    p.add_argument("--scheduler-out", required=True, help="where the few-step scheduler is written and read from")
    p.add_argument("--context-file", default=None)
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-shape", type=int, nargs=4, required=True, metavar=("C", "T", "H", "W"))
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--mid-times", type=float, nargs="+", default=None)
    p.add_argument("--bf16", action="store_true", help="transformer in bf16 (its fp32 modules stay fp32)")
    p.add_argument("--device", default=None)
    p.add_argument("--decode", default=None, help="folder for mp4s of the text prompts' last step count")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--out", required=True)
    return p


def padded_contexts(path: str, text_len: int) -> torch.Tensor:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    ctx = blob["context"]
    embs = list(ctx) if not isinstance(ctx, torch.Tensor) or ctx.dim() == 3 else [ctx]
    out = torch.zeros(len(embs), text_len, embs[0].shape[-1])
    for i, e in enumerate(embs):
        out[i, :min(text_len, e.shape[0])] = e.float()[:text_len]
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("transformer", "pipeline"):
        if not os.path.isdir(getattr(args, flag)):
            print(f"diffusers_sample.py: error: --{flag} {getattr(args, flag)}: no such directory", file=sys.stderr)
            return 2
    if args.context_file is None and not args.prompt:
        print("diffusers_sample.py: error: pass --context-file and/or --prompt", file=sys.stderr)
        return 2
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from rcm_megatron.convert.diffusers_scheduler import RCMFlowMatchScheduler, initial_latents
    from rcm_megatron.rcm.rng import KeyedRNG
    from rcm_megatron.rcm.sampling import OFFICIAL_MID_TIMES

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    mid = tuple(args.mid_times) if args.mid_times else OFFICIAL_MID_TIMES
    RCMFlowMatchScheduler(sigma_max=args.sigma_max, mid_times=mid).save_pretrained(args.scheduler_out)
    t0 = time.time()
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(args.pipeline, "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(os.path.join(args.pipeline, "text_encoder"),
                                                      torch_dtype=torch.float32),
        vae=AutoencoderKLWan.from_pretrained(os.path.join(args.pipeline, "vae"), torch_dtype=torch.float32),
        transformer=WanTransformer3DModel.from_pretrained(args.transformer, torch_dtype=dtype),
        scheduler=RCMFlowMatchScheduler.from_pretrained(args.scheduler_out)).to(device)
    pipe.set_progress_bar_config(disable=True)
    print(f"loaded WanPipeline (transformer {str(dtype).replace('torch.', '')}) in {time.time() - t0:.1f} s", flush=True)
    shape = tuple(args.latent_shape)
    tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    size = dict(num_frames=(shape[1] - 1) * tf + 1, height=shape[2] * sf, width=shape[3] * sf, guidance_scale=1.0,
                max_sequence_length=args.text_len)
    inputs = {}
    if args.context_file:
        inputs["context"] = dict(prompt_embeds=padded_contexts(args.context_file, args.text_len).to(device))
    if args.prompt:
        inputs["prompt"] = dict(prompt=list(args.prompt))
    out = {"seed": args.seed, "latent_shape": list(shape), "sigma_max": args.sigma_max, "mid_times": list(mid),
           "dtype": str(dtype), "prompts": list(args.prompt), "seconds": {}}
    for name, kw in inputs.items():
        n = kw["prompt_embeds"].shape[0] if "prompt_embeds" in kw else len(kw["prompt"])
        noise = KeyedRNG(args.seed, 0).normal("sample.noise", list(range(n)), shape)
        out[name] = {}
        for steps in (args.steps if name == "context" else args.steps[-1:]):
            pipe.scheduler.use_keyed_noise(args.seed, list(range(n)))
            t0 = time.time()
            lat = pipe(num_inference_steps=steps, latents=initial_latents(noise, args.sigma_max).float().to(device),
                       output_type="latent", **size, **kw).frames
            out["seconds"][f"{name}_{steps}"] = time.time() - t0
            out[name][steps] = lat.float().cpu()
            print(f"{name}: {n} sample(s), {steps} step(s) in {out['seconds'][f'{name}_{steps}']:.1f} s", flush=True)
    torch.save(out, args.out)
    if args.decode and "prompt" in out:
        import numpy as np

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                        "tools"))
        from generate import write_mp4

        os.makedirs(args.decode, exist_ok=True)
        pipe.scheduler.use_keyed_noise(args.seed, list(range(len(args.prompt))))
        noise = KeyedRNG(args.seed, 0).normal("sample.noise", list(range(len(args.prompt))), shape)
        video = pipe(num_inference_steps=args.steps[-1], latents=initial_latents(noise, args.sigma_max).float().to(device),
                     output_type="np", prompt=list(args.prompt), **size).frames
        for i, v in enumerate(video):
            write_mp4(os.path.join(args.decode, f"diffusers_{i}.mp4"),
                      torch.from_numpy((np.clip(v, 0, 1) * 255).round().astype(np.uint8)), args.fps)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
