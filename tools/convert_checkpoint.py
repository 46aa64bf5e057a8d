#!/usr/bin/env python
"""Convert Wan2.1 DiT weights between Hugging Face diffusers, original Wan2.1 and rcm-megatron checkpoints.

    # a teacher into our distributed checkpoint (loads at any TP/CP/PP layout)
    python tools/convert_checkpoint.py import --hf-dir Wan2.1-T2V-14B-Diffusers/transformer --save ckpt/wan14b
    python tools/convert_checkpoint.py import --wan-pth Wan2.1-T2V-1.3B/ --save ckpt/wan1.3b     # original layout
    torchrun ... pretrain_rcm.py --teacher-checkpoint ckpt/wan14b ...                            # no --model needed

    # a distilled student back to diffusers (WanTransformer3DModel.from_pretrained(OUT) loads it)
    python tools/convert_checkpoint.py export --load runs/x/checkpoints --out student-diffusers --ema --dtype bf16

    # Wan2.1 I2V imports like T2V (its image branch is part of the DiT). Wan2.2 A14B (two experts): the
    # pipeline folder (transformer/ + transformer_2/, boundary_ratio in model_index.json) or the original
    # release folder (high_noise_model/ + low_noise_model/) -> SAVE/high_noise, SAVE/low_noise, SAVE/experts.json
    python tools/convert_checkpoint.py import --hf-dir Wan2.2-I2V-A14B-Diffusers --save ckpt/wan22
    python tools/convert_checkpoint.py import --wan-pth Wan2.2-I2V-A14B --save ckpt/wan22 --boundary-ratio 0.9
    python tools/convert_checkpoint.py export --load ckpt/wan22 --out wan22-diffusers   # transformer/ + transformer_2/

    python tools/convert_checkpoint.py info PATH       # architecture and weights of any source
    python tools/convert_checkpoint.py verify runs/x/checkpoints   # every file against its recorded checksum

Everything is streamed tensor by tensor (import) or output shard by output shard (export);
the last line reports the process's peak RSS. Exit code 2 on bad input (a wrong folder, an
architecture mismatch, missing or unexpected keys: the message lists them).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcm_megatron.checkpointing.expert_source import EXPERT_KEYS, EXPERTS_FILE, is_expert_checkpoint  # noqa: E402
from rcm_megatron.cli import ArgumentParser, quiet_optional_backends  # noqa: E402

quiet_optional_backends()  # before anything imports megatron-core

PROG = "convert_checkpoint.py"


class UsageError(Exception):
    pass


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _progress(label: str, every: float = 10.0):
    start, last = time.time(), [0.0]

    def report(done: int, total: int, what: str):
        now = time.time()
        if done == total or now - last[0] >= every:
            last[0] = now
            print(f"{label}: {done}/{total} ({what}), {now - start:.0f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)

    return report


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="diffusers folder or original Wan2.1 checkpoint -> our distributed checkpoint")
    src = imp.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="diffusers WanTransformer3DModel folder (or a pipeline folder with transformer/)")
    src.add_argument("--wan-pth", help="original Wan2.1 checkpoint: .pth/.pt, single .safetensors, or the release "
                                       "folder (config.json with _class_name WanModel + safetensors shards)")
    imp.add_argument("--save", required=True, help="checkpoint directory to write (iter_0000000/ + marker)")
    imp.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "keep"),
                     help="stored dtype (default fp32, the training master dtype; keep: as in the source)")
    imp.add_argument("--config", help="architecture for a bare .pth: a config.json (original, diffusers or ours)")
    imp.add_argument("--num-heads", type=int, help="attention heads for a bare .pth (default: width / 128)")
    imp.add_argument("--overwrite", action="store_true", help="replace a converted model already in --save")
    imp.add_argument("--boundary-ratio", type=float, default=None,
                     help="two-expert source: the expert boundary (default: model_index.json's; original releases: "
                          "I2V A14B 0.9, T2V A14B 0.875 by in_channels)")

    exp = sub.add_parser("export", help="our checkpoint (any layout) -> diffusers WanTransformer3DModel folder")
    exp.add_argument("--load", required=True, help="our checkpoint directory (training --save or import output), "
                                                   "or any source open_source reads")
    exp.add_argument("--out", required=True, help="diffusers folder to write")
    w = exp.add_mutually_exclusive_group()
    w.add_argument("--ema", action="store_true", help="export the power-EMA weights (default: the raw student)")
    w.add_argument("--weights", choices=("student", "ema", "fake_score", "model"),
                   help="which model of the checkpoint (default: student, or the model of an imported checkpoint)")
    exp.add_argument("--iteration", type=int, help="checkpoint iteration (default: the latest committed)")
    exp.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "keep"),
                     help="weights dtype (default fp32: exact; bf16 keeps diffusers' fp32 modules in fp32)")
    exp.add_argument("--max-shard-size", default="5GB", help="split the safetensors above this size (default 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    info = sub.add_parser("info", help="print the architecture and weights of a source")
    info.add_argument("path")

    ver = sub.add_parser("verify", help="check every file of our checkpoints against the checksums recorded at commit")
    ver.add_argument("path", help="a checkpoint directory (every committed iteration in it) or one iter_NNNNNNN folder")
    ver.add_argument("--iteration", type=int, help="only this iteration")
    ver.add_argument("--record", action="store_true",
                     help="first record checksums for folders committed before checksums existed (no checksums.json), "
                          "trusting their present content")
    return p




def expert_folders(path: str) -> dict[str, str] | None:
    """{'high_noise': folder, 'low_noise': folder} of a two-expert source (a diffusers Wan2.2 A14B pipeline,
    the original release or an imported experts directory), else None."""
    from rcm_megatron.convert.diffusers_wan import EXPERT_SUBFOLDERS
    from rcm_megatron.convert.wan_original import EXPERT_FOLDERS

    if not os.path.isdir(path):
        return None
    if is_expert_checkpoint(path):
        return {k: os.path.join(path, k) for k in EXPERT_KEYS}
    for layout in (EXPERT_SUBFOLDERS, EXPERT_FOLDERS):
        if all(os.path.isdir(os.path.join(path, d)) for d in layout.values()):
            return {k: os.path.join(path, d) for k, d in layout.items()}
    return None


def boundary_ratio(path: str, given: float | None, in_channels: int) -> float:
    import json

    from rcm_megatron.convert.diffusers_wan import MODEL_INDEX
    from rcm_megatron.models.experts import BOUNDARY_RATIOS

    if given is not None:
        if not 0 < given < 1:
            raise UsageError(f"--boundary-ratio must be in (0, 1), got {given}")
        return given
    for name in (EXPERTS_FILE, MODEL_INDEX):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f) as fh:
                ratio = json.load(fh).get("boundary_ratio")
            if ratio is not None:
                return float(ratio)
    return BOUNDARY_RATIOS["i2v-a14b" if in_channels > 16 else "t2v-a14b"]


def import_experts(args, folders: dict[str, str], src_path: str) -> int:
    """Both experts of a Wan2.2 A14B source into SAVE/high_noise and SAVE/low_noise, checked against each other."""
    import json

    from rcm_megatron.checkpointing.loading import describe, open_source
    from rcm_megatron.checkpointing.model_writer import write_model_checkpoint
    from rcm_megatron.checkpointing.sources import parse_dtype

    kind = "diffusers" if args.hf_dir is not None else "wan"
    sources = {k: open_source(f, kind=kind) for k, f in folders.items()}
    try:
        high, low = sources["high_noise"].config, sources["low_noise"].config
        if high != low:
            raise UsageError(f"{src_path}: the two experts differ in architecture ({folders['high_noise']}: {high}; "
                             f"{folders['low_noise']}: {low})")
        ratio = boundary_ratio(src_path, args.boundary_ratio, high.in_channels)
        for key, src in sources.items():
            print(f"{key}: {describe(src)}", flush=True)
            write_model_checkpoint(os.path.join(args.save, key), src, parse_dtype(args.dtype),
                                   overwrite=args.overwrite, progress=_progress(f"import {key}"))
    finally:
        for src in sources.values():
            src.close()
    with open(os.path.join(args.save, EXPERTS_FILE), "w") as f:
        json.dump({"boundary_ratio": ratio, "high_noise": "high_noise", "low_noise": "low_noise",
                   "source": os.path.abspath(src_path)}, f, indent=1)
    print(f"wrote {args.save}: two experts (high_noise/, low_noise/, boundary_ratio {ratio}); each is a "
          f"--teacher-checkpoint; peak RSS {peak_rss_gb():.2f} GB", flush=True)
    return 0


def cmd_import(args) -> int:
    from rcm_megatron.checkpointing.loading import describe, open_source
    from rcm_megatron.checkpointing.model_writer import write_model_checkpoint
    from rcm_megatron.checkpointing.sources import parse_dtype, read_config_file

    if args.hf_dir is not None and (args.config is not None or args.num_heads is not None):
        raise UsageError("--config / --num-heads apply to --wan-pth only (a diffusers folder has its config.json)")
    folders = expert_folders(args.hf_dir if args.hf_dir is not None else args.wan_pth)
    if folders is not None:
        if args.config is not None or args.num_heads is not None:
            raise UsageError("--config / --num-heads apply to a bare .pth, not to a two-expert folder")
        return import_experts(args, folders, args.hf_dir if args.hf_dir is not None else args.wan_pth)
    if args.boundary_ratio is not None:
        raise UsageError("--boundary-ratio applies to a two-expert (Wan2.2 A14B) source only")
    config = read_config_file(args.config) if args.config else None
    if args.hf_dir is not None:
        src = open_source(args.hf_dir, kind="diffusers")
    else:
        src = open_source(args.wan_pth, kind="wan" if os.path.isdir(args.wan_pth) else "file", config=config,
                          num_heads=args.num_heads)
    with src:
        print(describe(src), flush=True)
        path = write_model_checkpoint(args.save, src, parse_dtype(args.dtype), overwrite=args.overwrite,
                                      progress=_progress("import"))
    print(f"wrote {path} (model checkpoint, {args.dtype}); use it as --teacher-checkpoint {args.save}; "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    return 0


def cmd_export(args) -> int:
    from rcm_megatron.checkpointing.diffusers_export import export_diffusers
    from rcm_megatron.checkpointing.dist_source import CheckpointSource, choose_weights, inspect_checkpoint
    from rcm_megatron.checkpointing.layout import is_checkpoint_dir
    from rcm_megatron.checkpointing.loading import describe, open_source
    from rcm_megatron.checkpointing.sources import parse_dtype, parse_size

    weights = "ema" if args.ema else args.weights
    if os.path.isfile(os.path.join(args.load, EXPERTS_FILE)):
        return export_experts(args, weights)
    if is_checkpoint_dir(args.load):
        info = inspect_checkpoint(args.load, args.iteration)
        weights = choose_weights(info, weights, order=("student", "model"))
        src = CheckpointSource(args.load, weights, args.iteration)
    else:
        if weights is not None or args.iteration is not None:
            raise UsageError(f"--load {args.load} is not an rcm-megatron checkpoint directory; --ema/--weights/"
                             "--iteration select from one")
        src = open_source(args.load)
    with src:
        print(describe(src), flush=True)
        summary = export_diffusers(src, args.out, parse_dtype(args.dtype), parse_size(args.max_shard_size),
                                   overwrite=args.overwrite, progress=_progress("export", every=0.0))
    print(f"wrote {args.out}: {len(summary['files'])} safetensors file(s), {summary['tensors']} tensors, "
          f"{summary['bytes'] / 1e9:.3f} GB ({args.dtype}); peak RSS {peak_rss_gb():.2f} GB", flush=True)
    return 0


def export_experts(args, weights) -> int:
    """An imported two-expert directory -> a diffusers folder with transformer/ (high noise), transformer_2/
    (low noise) and model_index.json's boundary_ratio (``WanImageToVideoPipeline`` loads both)."""
    import json

    from rcm_megatron.checkpointing.diffusers_export import export_diffusers
    from rcm_megatron.checkpointing.loading import open_source
    from rcm_megatron.checkpointing.sources import parse_dtype, parse_size
    from rcm_megatron.convert.diffusers_wan import EXPERT_SUBFOLDERS, MODEL_INDEX

    with open(os.path.join(args.load, EXPERTS_FILE)) as f:
        info = json.load(f)
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it")
    for key, sub in EXPERT_SUBFOLDERS.items():
        with open_source(os.path.join(args.load, info.get(key, key)), weights=weights, iteration=args.iteration) as src:
            export_diffusers(src, os.path.join(args.out, sub), parse_dtype(args.dtype), parse_size(args.max_shard_size),
                             overwrite=True, progress=_progress(f"export {key}", every=0.0))
    index_path = os.path.join(args.out, MODEL_INDEX)
    index = {}
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index.update({sub: ["diffusers", "WanTransformer3DModel"] for sub in EXPERT_SUBFOLDERS.values()})
    index["boundary_ratio"] = float(info["boundary_ratio"])
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
    print(f"wrote {args.out}: transformer/ and transformer_2/, boundary_ratio {info['boundary_ratio']}; "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    return 0


def cmd_info(args) -> int:
    from rcm_megatron.checkpointing.dist_source import inspect_checkpoint
    from rcm_megatron.checkpointing.layout import is_checkpoint_dir
    from rcm_megatron.checkpointing.loading import describe, open_source

    if is_checkpoint_dir(args.path):
        info = inspect_checkpoint(args.path)
        print(f"{info.path}: {info.kind} checkpoint, iteration {info.iteration}, weights {info.weights}")
    with open_source(args.path) as src:
        print(describe(src))
        src.check()
        print(f"config: {src.config.to_dict()}")
    return 0


def cmd_verify(args) -> int:
    from rcm_megatron.checkpointing.checksums import MANIFEST, verify_folder, write_manifest
    from rcm_megatron.checkpointing.errors import CheckpointError
    from rcm_megatron.checkpointing.layout import checkpoint_path, committed_iterations, is_iteration_folder

    if args.iteration is not None:
        folders = [checkpoint_path(args.path, args.iteration)]
    elif is_iteration_folder(args.path):
        folders = [args.path]
    else:
        folders = [checkpoint_path(args.path, it) for it in committed_iterations(args.path)]
        if not folders:
            raise UsageError(f"{args.path}: no committed iter_NNNNNNN checkpoint folder")
    failed = 0
    for folder in folders:
        if args.record and not os.path.isfile(os.path.join(folder, MANIFEST)):
            write_manifest(folder)
            print(f"{folder}: recorded checksums of its present content", flush=True)
        try:
            n = verify_folder(folder)
            print(f"{folder}: ok ({n} files, crc32)", flush=True)
        except CheckpointError as e:
            failed += 1
            print(f"{PROG} verify: error: {e}", file=sys.stderr, flush=True)
    return 2 if failed else 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from rcm_megatron.checkpointing.errors import CheckpointError, ConversionError

    try:
        return {"import": cmd_import, "export": cmd_export, "info": cmd_info,
                "verify": cmd_verify}[args.command](args)
    except (UsageError, ConversionError, CheckpointError, FileNotFoundError, FileExistsError, KeyError,
            ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
