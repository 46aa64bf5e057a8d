"""examples/configs/wan-1.3b.sh as shipped fits one 80 GB H100 at Wan-1.3B 480p x 81 frames by the
memory plan pretrain_rcm.py checks before building models (planning.check_fits), on one GPU and on the
sbatch script's 8; without its activation recompute it would not (the with-grad passes need ~140 GiB)."""

import pytest

from rcm_megatron.models.config import preset
from rcm_megatron.planning.search import check_fits
from rcm_megatron.training.arguments import build_parser
from test_examples import config_args

H100_GIB = 81559 / 1024  # nvidia-smi's 81559 MiB


def parsed(drop=()):
    args, skip = [], False
    for a in config_args("wan-1.3b"):
        if skip and not a.startswith("--"):
            continue
        skip = a in drop
        if not skip:
            args.append(a)
    return build_parser().parse_args(args)


@pytest.mark.parametrize("gpus", [1, 8])
def test_wan13b_config_fits_an_h100(gpus):
    line = check_fits(parsed(), preset("wan-1.3b"), world_size=gpus, gpu_memory_gib=H100_GIB, headroom=0.05)
    assert line is None, line


def test_without_recompute_it_would_not_fit():
    line = check_fits(parsed(drop={"--recompute-granularity", "--recompute-num-layers"}), preset("wan-1.3b"),
                      world_size=1, gpu_memory_gib=H100_GIB)
    assert line is not None and "--recompute-granularity full" in line, line
