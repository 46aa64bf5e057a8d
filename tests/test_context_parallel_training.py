"""pretrain_rcm.py under torchrun (gloo, CPU) with context parallelism logs the single-process
losses and gradient norms, for every --cp-comm-type.

The latents give 3 x 3 x 5 = 45 tokens: not divisible by CP = 2 (a padded chunk) and 3
latent frames on 2 ranks. Equal gradient norms check the DP x CP gradient reduction directly
(AdamW's update is nearly scale-free, so the losses alone would not show a factor of CP).
"""


import pytest

from test_parallel_training import assert_same_losses, grad_norms, losses, torchrun

pytestmark = pytest.mark.slow  # pretrain_rcm.py under torchrun

ITERS = ["--train-iters", "4"]
LATENTS = ["--latent-shape", "16", "3", "6", "10"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp1")
    torchrun(1, *ITERS, *LATENTS, "--log-dir", str(d))
    return d


# Every --cp-comm-type, at DP = 1 and DP = 2: plain CP = 2 with a2a and with p2p are each a
# sub-layout of one below (dp2-cp2-a2a; tp2-sp-cp2-p2p, which is DP = 1), and the model's CP
# attention itself is checked per comm type in test_context_parallel.py, so they are not run again.
@pytest.mark.parametrize("nproc,layout", [
    (2, ["--context-parallel-size", "2", "--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "1"]),
    (4, ["--context-parallel-size", "2", "--cp-comm-type", "p2p", "--tensor-model-parallel-size", "2",
         "--sequence-parallel"]),
    (4, ["--context-parallel-size", "2", "--cp-comm-type", "a2a"]),
], ids=["cp2-a2a+p2p", "tp2-sp-cp2-p2p", "dp2-cp2-a2a"])
def test_context_parallel_logs_the_same_losses(baseline, tmp_path, nproc, layout):
    torchrun(nproc, *ITERS, *LATENTS, "--log-dir", str(tmp_path), *layout)
    assert_same_losses(losses(baseline), losses(tmp_path))
    assert grad_norms(tmp_path) == pytest.approx(grad_norms(baseline), rel=1e-4)


def test_a2a_refuses_heads_not_divisible_by_cp(tmp_path):
    p = torchrun(3, *ITERS, *LATENTS, "--log-dir", str(tmp_path), "--context-parallel-size", "3",
                 "--cp-comm-type", "a2a", check=False)
    assert p.returncode != 0
    assert "divisible by --context-parallel-size 3; use --cp-comm-type p2p" in p.stderr
