"""GPU probe: resume distributed-optimizer state at another pipeline size.

    torchrun --nproc-per-node 4 benchmarks/dist_opt_pp_reshard.py --dump-after 150 PRETRAIN_FLAGS...

The trainer refuses such a load (``Trainer._check_dist_opt_pipeline_size``: a DP2 -> PP2 x DP2
load hung on 4 H100s on 2026-11-27). This runs ``pretrain_rcm.main`` with that refusal switched
off, and every rank dumps its Python stacks (faulthandler) and exits after ``--dump-after``
seconds, so a hang shows where each rank waits. Pass ``--distributed-timeout-minutes`` too, so
NCCL's watchdog names the stuck collective. Compare the logged losses with a straight run.
"""

import argparse
import faulthandler
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump-after", type=float, default=150.0, help="seconds before every rank dumps its stacks")
    a, flags = ap.parse_known_args()
    faulthandler.dump_traceback_later(a.dump_after, exit=True)
    from rcm_megatron.training.trainer import Trainer

    Trainer._check_dist_opt_pipeline_size = lambda self, meta, where: None
    import pretrain_rcm

    rc = pretrain_rcm.main(flags)
    faulthandler.cancel_dump_traceback_later()
    return rc


if __name__ == "__main__":
    sys.exit(main())
