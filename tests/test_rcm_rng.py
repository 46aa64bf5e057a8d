"""Keyed randomness: any split of a global batch draws the same numbers."""

import torch

from rcm_megatron.rcm.rng import KeyedRNG, stable_seed


def test_split_batch_draws_equal_whole_batch():
    rng = KeyedRNG(seed=11, iteration=5)
    for draw in (lambda idx: rng.normal("eps", idx, (2, 3)), lambda idx: rng.uniform("t", idx),
                 lambda idx: rng.randint("n", idx, 1, 5)):
        whole = draw(list(range(8)))
        assert torch.equal(whole, torch.cat([draw([0, 1, 2, 3]), draw(torch.arange(4, 8))]))
        # any permutation / interleaving (e.g. DP rank r holding samples r, r+2, ...)
        assert torch.equal(whole[[1, 3, 5, 7]], draw([1, 3, 5, 7]))


def test_keys_separate_streams():
    a = KeyedRNG(0, 0).normal("eps", [0, 1], (16,))
    assert not torch.equal(a[0], a[1])
    for other in (KeyedRNG(1, 0).normal("eps", [0, 1], (16,)), KeyedRNG(0, 1).normal("eps", [0, 1], (16,)),
                  KeyedRNG(0, 0).normal("eps2", [0, 1], (16,))):
        assert not torch.equal(a, other)


def test_stable_seed_is_fixed_across_processes():
    """blake2b, not the per-process salted hash(): these values must never change, or
    checkpointed runs would stop reproducing."""
    assert stable_seed(0, 0, 0, "scm.eps") == 2078456582987810478
    assert stable_seed(1234, 10, 7, "dmd.t") == 6081102243379407259
    assert 0 <= stable_seed(-1, 2**40, 3, "x") < 2**63


def test_dtype_and_device_arguments():
    rng = KeyedRNG(2, 3)
    x = rng.normal("eps", [4], (3,), dtype=torch.float32, device="cpu")
    assert x.dtype == torch.float32 and x.shape == (1, 3)
    n = rng.randint("n", [0, 1, 2], 1, 3)
    assert n.dtype == torch.int64 and ((n >= 1) & (n < 3)).all()
