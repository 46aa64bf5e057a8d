#!/usr/bin/env python
"""Export one model of a training checkpoint to an rcm-megatron model file.

    python tools/export_teacher.py runs/toy_teacher/checkpoints assets/toy_teacher.pt            # EMA weights
    python tools/export_teacher.py CKPT_DIR out.pt --weights student --iteration 3000

The output is what ``--teacher-checkpoint`` reads (``save_model_file``: {"format", "config",
"model", "meta"}), e.g. the teacher of ``pretrain_rcm.py --mode teacher`` or a distilled student.
``--dtype`` bfloat16 halves the file; the default float32 keeps it exact.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcm_megatron.cli import ArgumentParser, quiet_optional_backends  # noqa: E402

quiet_optional_backends()  # before anything imports megatron-core

from rcm_megatron.checkpointing.dist_source import TRAIN_WEIGHTS  # noqa: E402
from rcm_megatron.checkpointing.loading import read_model_source  # noqa: E402
from rcm_megatron.checkpointing.model_file import save_model_file  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="training checkpoint directory (--save of pretrain_rcm.py)")
    p.add_argument("output", help="model file to write (.pt)")
    p.add_argument("--weights", choices=TRAIN_WEIGHTS, default="ema", help="which model (default: the power EMA)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        print(f"export_teacher.py: error: {args.checkpoint}: no such checkpoint directory", file=sys.stderr)
        return 2
    try:
        cfg, sd, meta = read_model_source(args.checkpoint, args.weights, args.iteration)
    except (OSError, ValueError, KeyError) as e:
        print(f"export_teacher.py: error: {e}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    sd = {k: v.detach().to(dtype).clone() for k, v in sd.items()}
    meta = {k: v for k, v in meta.items() if k != "teacher" and v is not None}
    save_model_file(args.output, cfg.to_dict(), sd, meta)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.output}: {args.weights} weights of iteration {meta.get('iteration')}, {n} parameters, "
          f"{os.path.getsize(args.output) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
