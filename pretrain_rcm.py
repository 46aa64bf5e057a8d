#!/usr/bin/env python
"""rCM distillation of Wan2.1 DiTs (Megatron-LM style flags).

    python pretrain_rcm.py                      # tiny model, built-in data, CPU, a few minutes
    torchrun --nproc-per-node 8 pretrain_rcm.py --teacher-checkpoint WAN_DIR --bf16 ...

Configuration errors print one line naming the flag, file or shape and exit with code 2,
before any model is built. SIGTERM / SIGUSR1 save and exit 0; Ctrl-C saves and exits 130
(a second Ctrl-C aborts without saving). Under torchrun a worker whose launcher is gone stops.
"""

import os
import sys

# Expandable segments keep the caching allocator from stranding reserved-but-unallocated blocks
# between the differently shaped passes of an rCM iteration (the eager Wan-1.3B run that ran out of
# memory on an H100 had 15.9 GiB reserved and unused); set before torch is imported, as torchtitan's
# and NeMo's launch scripts do. A user's own PYTORCH_CUDA_ALLOC_CONF wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def main(argv=None) -> int:
    from rcm_megatron.cli import quiet_optional_backends

    quiet_optional_backends()
    from rcm_megatron.parallel.initialize import launched_by_torchrun
    from rcm_megatron.training.arguments import ArgumentError, parse_args
    from rcm_megatron.training.flag_names import format_implied

    if launched_by_torchrun():
        from rcm_megatron.training.launcher_watch import exit_when_launcher_dies

        exit_when_launcher_dies()
    try:
        train, model_cfg, rcm_cfg, par = parse_args(argv)
        if train.implied and os.environ.get("RANK", "0") == "0":
            print(format_implied(train), flush=True)
        from rcm_megatron.training.trainer import Trainer

        trainer = Trainer(train, model_cfg, rcm_cfg, par)
    except ArgumentError as e:
        print(f"pretrain_rcm.py: error: {e}", file=sys.stderr)
        return 2
    from rcm_megatron.training.trainer import TrainingAborted

    teardown = True
    try:
        trainer.run()
    except ArgumentError as e:
        print(f"pretrain_rcm.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"pretrain_rcm.py: aborted: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the training loop (building, loading): nothing to save yet
        teardown = False
        print("pretrain_rcm.py: interrupted before training started; nothing saved", file=sys.stderr)
        return 130
    except Exception:
        # An unexpected failure, possibly on this rank alone while the others wait inside a
        # collective for it: say so now, and skip the process-group teardown, which under NCCL
        # would wait for those ranks (and hold the traceback back) until the collective timeout.
        # torchrun then stops the other ranks. Committed checkpoints are untouched; one still
        # being written stays uncommitted and is never loaded.
        teardown = False
        import traceback

        from rcm_megatron.parallel.initialize import rank

        print(f"pretrain_rcm.py: rank {rank()} failed:", file=sys.stderr)
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        if teardown:
            from rcm_megatron.parallel.initialize import destroy_distributed

            destroy_distributed()
    return trainer.stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
