"""--distributed-timeout-minutes: validated, and given to every process group (the default one
and megatron-core's), so a stuck collective aborts the job instead of hanging it."""

import datetime

import pytest
import torch

from distributed_utils import run_distributed
from rcm_megatron.parallel.config import ParallelConfig


def _timeouts():
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    def minutes(group):
        return group._get_backend(torch.device("cpu")).options._timeout / datetime.timedelta(minutes=1)

    return {"world": minutes(dist.group.WORLD), "dp": minutes(mpu.get_data_parallel_group()),
            "tp": minutes(mpu.get_tensor_model_parallel_group())}


@pytest.mark.slow
def test_timeout_reaches_every_group():
    out = run_distributed(_timeouts, 2, ParallelConfig(distributed_timeout_minutes=1))
    assert out == [{"world": 1.0, "dp": 1.0, "tp": 1.0}] * 2


def test_bad_timeout_names_the_flag(tmp_path):
    from rcm_megatron.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match="--distributed-timeout-minutes must be a positive integer, got 0"):
        parse_args(["--model", "tiny", "--distributed-timeout-minutes", "0", "--log-dir", str(tmp_path)])
    train, _, _, par = parse_args(["--model", "tiny", "--distributed-timeout-minutes", "3", "--log-dir",
                                   str(tmp_path)])
    assert par.distributed_timeout_minutes == 3
