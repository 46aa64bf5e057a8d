#!/usr/bin/env python
"""Apply what distillation changed in a teacher to another model of the same architecture.

    out = base + scale * (student - teacher), tensor by tensor, written as a diffusers folder.

    # a distilled Wan2.1 T2V 14B student onto Wan2.2 T2V A14B (both experts of a pipeline folder)
    python tools/merge_delta.py --student runs/wan14b/checkpoints --student-weights ema \\
        --teacher Wan2.1-T2V-14B-Diffusers/transformer --base Wan2.2-T2V-A14B-Diffusers --out merged --dtype bf16

    python tools/merge_delta.py ... --dry-run      # list what would change (relative delta per tensor), write nothing

Each of --student, --teacher and --base is anything tools/convert_checkpoint.py reads (our
checkpoint directory, a diffusers folder, an original Wan checkpoint). A --base pipeline folder
with transformer/ and transformer_2/ (Wan2.2 A14B) gets the delta in both experts; --out then
holds transformer/, transformer_2/ and the base's model_index.json (boundary_ratio). Names and
shapes must line up: the first mismatch is named (exit 2) before anything is written; --exclude
REGEX keeps the base's values for matching tensors (e.g. '^patch_embedding' when the base takes
more input channels than the student, as Wan2.2 I2V does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcm_megatron.cli import ArgumentParser, quiet_optional_backends  # noqa: E402

quiet_optional_backends()  # before anything imports megatron-core

PROG = "merge_delta.py"
EXPERT_SUBFOLDERS = ("transformer", "transformer_2")


class UsageError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--student", required=True, help="the distilled model (our checkpoint, diffusers or original Wan)")
    p.add_argument("--student-weights", choices=("student", "ema"),
                   help="which weights of a training checkpoint (default: student)")
    p.add_argument("--teacher", required=True, help="the model the student was distilled from")
    p.add_argument("--base", required=True, help="the model to receive the delta (a Wan2.2 A14B pipeline folder: "
                                                 "both experts)")
    p.add_argument("--out", help="diffusers folder to write (required unless --dry-run)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier of the delta (default 1)")
    p.add_argument("--exclude", help="regex on parameter names (ours, e.g. '^patch_embedding'): keep the base's values")
    p.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    p.add_argument("--dtype", default="keep", choices=("fp32", "bf16", "keep"),
                   help="output dtype (default keep: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _open(path: str, weights: str | None = None):
    from rcm_megatron.checkpointing.layout import is_checkpoint_dir
    from rcm_megatron.checkpointing.loading import open_source

    if weights is not None and not is_checkpoint_dir(path):
        raise UsageError(f"--student-weights selects from a training checkpoint; {path} is not one")
    return open_source(path, weights=weights) if weights is not None else open_source(path)


def _bases(path: str) -> dict[str, str]:
    """{output subfolder or '': base path}: both experts of a two-expert pipeline folder, else the path."""
    if os.path.isdir(path) and all(os.path.isdir(os.path.join(path, d)) for d in EXPERT_SUBFOLDERS):
        return {d: os.path.join(path, d) for d in EXPERT_SUBFOLDERS}
    return {"": path}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from rcm_megatron.checkpointing.errors import CheckpointError, ConversionError

    try:
        return run(args)
    except (UsageError, ConversionError, CheckpointError, FileNotFoundError, FileExistsError, KeyError,
            ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


def run(args) -> int:
    import re

    from rcm_megatron.convert.delta import DeltaSource, delta_report
    from rcm_megatron.checkpointing.diffusers_export import export_diffusers
    from rcm_megatron.checkpointing.sources import parse_dtype

    if not math.isfinite(args.scale):
        raise UsageError(f"--scale must be a finite number, got {args.scale}")
    if args.out is None and not args.dry_run:
        raise UsageError("--out is required (or --dry-run)")
    if args.exclude is not None:
        try:
            re.compile(args.exclude)
        except re.error as e:
            raise UsageError(f"--exclude {args.exclude!r} is not a regular expression: {e}") from e
    if args.out and not args.dry_run and os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it")
    bases = _bases(args.base)
    sources = {}
    try:
        for sub, path in bases.items():  # every check before anything is written
            src = DeltaSource(_open(path), _open(args.student, args.student_weights), _open(args.teacher),
                              args.scale, args.exclude)
            sources[sub] = src
            src.check()
        for sub, src in sources.items():
            where = os.path.join(args.base, sub) if sub else args.base
            if args.dry_run:
                rows = delta_report(src)
                print(f"{where}: {len(rows)} of {len(src.tensors)} tensors would change "
                      f"(scale {args.scale:g}; relative change ||delta|| / ||base||):")
                for name, shape, r in rows:
                    print(f"  {name} {list(shape)} {r:.3e}")
                if src.kept:
                    print(f"  kept from the base (--exclude): {src.kept}")
                continue
            out = os.path.join(args.out, sub) if sub else args.out
            summary = export_diffusers(src, out, parse_dtype(args.dtype), overwrite=True)
            print(f"wrote {out}: {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB", flush=True)
    finally:
        for src in sources.values():
            src.close()
    index = os.path.join(args.base, "model_index.json")
    if not args.dry_run and len(bases) > 1 and os.path.isfile(index):
        shutil.copyfile(index, os.path.join(args.out, "model_index.json"))
        with open(index) as f:
            print(f"copied model_index.json (boundary_ratio {json.load(f).get('boundary_ratio')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
