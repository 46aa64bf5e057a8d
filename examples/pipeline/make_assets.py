#!/usr/bin/env python
"""Stand-ins for what a user brings: encoded videos with captions, and a Wan2.1-style model folder.

    python examples/pipeline/make_assets.py videos --out work/videos --count 8 --frames 85 --height 480 --width 832
    python examples/pipeline/make_assets.py models --out work/wan --manifest work/videos/manifest.csv

``videos``: H.264 (.mp4, libx264) and VP9 (.webm, libvpx-vp9) files alternately, written with
PyAV from procedural frames (a coloured ball moving over a gradient, one colour/direction per
video), and ``manifest.csv`` (video, caption) as tools/prepare_data.py reads it.

``models``: the folder layout of a Wan2.1 diffusers release (``vae/``, ``text_encoder/``,
``tokenizer/``), so every tool is pointed at it exactly as at Wan2.1-T2V-1.3B-Diffusers:
  - vae/: diffusers ``AutoencoderKLWan`` with its default config (the Wan2.1 VAE), random weights;
    ``--tiny``: a 4-level, base width 8 VAE with the same structure.
  - tokenizer/: Hugging Face can not be reached, so a Unigram tokenizer (``tokenizers``) is trained
    on the captions and Wan's negative prompt, with umT5's special tokens (<pad> 0, </s> 1, <unk> 2)
    and the end token appended, as umT5's tokenizer does.
  - text_encoder/: transformers ``UMT5EncoderModel``, random weights. ``--text-encoder-config xxl``:
    umT5-XXL's encoder (d_model 4096, 24 layers, 64 heads, d_ff 10240, gated GELU) with the trained
    tokenizer's vocabulary instead of 256,384 rows; ``small``: width 4096 (Wan's text_dim), 2 layers;
    ``tiny``: width 64 (the tiny DiT preset's text_dim), 2 layers.
Built on the GPU when there is one (random init of billions of weights on CPU is slow).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import numpy as np

COLOURS = [("red", (230, 40, 40)), ("green", (40, 200, 60)), ("blue", (50, 80, 230)), ("yellow", (230, 220, 40)),
           ("white", (240, 240, 240)), ("purple", (160, 50, 200)), ("orange", (250, 140, 20)), ("cyan", (40, 210, 220))]
MOTIONS = [("left to right", (1, 0)), ("top to bottom", (0, 1)), ("right to left", (-1, 0)), ("in a circle", None)]
BACKGROUNDS = ["a dark blue sky", "a sunset gradient", "a grey floor", "a green field"]
UMT5_XXL = dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240)
TEXT_CONFIGS = {"xxl": UMT5_XXL, "small": dict(d_model=4096, num_layers=2, num_heads=64, d_kv=64, d_ff=10240),
                "tiny": dict(d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128)}
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])


def frame(i: int, n: int, k: int, h: int, w: int) -> np.ndarray:
    """Frame i of n of video k: a ball of colour k moving along motion k over background k."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = np.stack([(x / w) * 80 + 20 * (k % 3), (y / h) * 120, 100 + 80 * np.sin(k + x / w * math.pi)], -1)
    p = i / max(1, n - 1)
    motion = MOTIONS[k % len(MOTIONS)][1]
    if motion is None:
        cx, cy = w / 2 + w / 4 * math.cos(2 * math.pi * p), h / 2 + h / 4 * math.sin(2 * math.pi * p)
    else:
        cx = w / 2 + motion[0] * (p - 0.5) * w * 0.7
        cy = h / 2 + motion[1] * (p - 0.5) * h * 0.7
    r = min(h, w) / 6
    inside = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
    img = np.where(inside[..., None], np.array(COLOURS[k % len(COLOURS)][1], np.float32), bg)
    return np.clip(img, 0, 255).astype(np.uint8)


def caption(k: int) -> str:
    colour, motion, bg = COLOURS[k % len(COLOURS)][0], MOTIONS[k % len(MOTIONS)][0], BACKGROUNDS[k % len(BACKGROUNDS)]
    return f"a {colour} ball moves {motion} over {bg}"


def write_video(path: str, codec: str, frames, fps: int) -> None:
    import av

    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps, options={"deadline": "realtime", "cpu-used": "8"} if "vpx" in codec else
                         {"preset": "veryfast"})
        h, w = frames[0].shape[:2]
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def cmd_videos(args) -> int:
    try:
        import av  # noqa: F401
    except ImportError:
        print("make_assets.py videos: error: PyAV is not installed (pip install av)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for k in range(args.count):
        name, codec = (f"clip{k:03d}.mp4", "libx264") if k % 2 == 0 else (f"clip{k:03d}.webm", "libvpx-vp9")
        frames = [frame(i, args.frames, k, args.height, args.width) for i in range(args.frames)]
        write_video(os.path.join(args.out, name), codec, frames, args.fps)
        rows.append({"video": name, "caption": caption(k)})
    with open(os.path.join(args.out, "manifest.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["video", "caption"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.count} videos ({args.frames} frames {args.height}x{args.width} at {args.fps} fps, "
          f"H.264 and VP9) and manifest.csv to {args.out}", flush=True)
    return 0


def train_tokenizer(texts: list[str], out: str, vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(out)
    return fast


def cmd_models(args) -> int:
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from rcm_megatron.data.encoders import WAN_NEGATIVE_PROMPT

    if not os.path.isfile(args.manifest):
        print(f"make_assets.py models: error: --manifest {args.manifest}: no such file", file=sys.stderr)
        return 2
    with open(args.manifest, newline="") as f:
        captions = [r["caption"] for r in csv.DictReader(f)]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**(TINY_VAE if args.tiny else {}))
    vae.save_pretrained(os.path.join(args.out, "vae"))
    n_vae = sum(p.numel() for p in vae.parameters())
    del vae
    tok = train_tokenizer(captions + [WAN_NEGATIVE_PROMPT] * 2, os.path.join(args.out, "tokenizer"), args.vocab_size)
    spec = TEXT_CONFIGS[args.text_encoder_config]
    cfg = UMT5Config(vocab_size=len(tok), feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                     relative_attention_max_distance=128, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                     decoder_start_token_id=0, **spec)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        enc = UMT5EncoderModel(cfg).to(dtype)
    enc.save_pretrained(os.path.join(args.out, "text_encoder"), max_shard_size="5GB")
    n_text = sum(p.numel() for p in enc.parameters())
    print(f"wrote {args.out}: vae/ (AutoencoderKLWan {'tiny' if args.tiny else 'default'} config, "
          f"{n_vae / 1e6:.1f} M params), tokenizer/ (Unigram, {len(tok)} tokens), text_encoder/ (UMT5EncoderModel "
          f"'{args.text_encoder_config}': d_model {cfg.d_model}, {cfg.num_layers} layers, {n_text / 1e9:.2f} B params, "
          f"{str(dtype).replace('torch.', '')}) in {time.time() - t0:.0f} s", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_assets.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("videos", help="H.264 / VP9 videos with captions and manifest.csv")
    v.add_argument("--out", required=True)
    v.add_argument("--count", type=int, default=8)
    v.add_argument("--frames", type=int, default=85)
    v.add_argument("--height", type=int, default=480)
    v.add_argument("--width", type=int, default=832)
    v.add_argument("--fps", type=int, default=16)
    m = sub.add_parser("models", help="vae/, tokenizer/, text_encoder/ with random weights")
    m.add_argument("--out", required=True)
    m.add_argument("--manifest", required=True, help="the captions the tokenizer is trained on")
    m.add_argument("--tiny", action="store_true", help="a tiny VAE (default: AutoencoderKLWan's default config)")
    m.add_argument("--text-encoder-config", choices=sorted(TEXT_CONFIGS), default="xxl")
    m.add_argument("--vocab-size", type=int, default=400)
    m.add_argument("--device", default=None)
    m.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("count", "frames", "height", "width", "fps", "vocab_size"):
        if getattr(args, flag, 1) < 1:
            print(f"make_assets.py: error: --{flag.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    return cmd_videos(args) if args.command == "videos" else cmd_models(args)


if __name__ == "__main__":
    sys.exit(main())
