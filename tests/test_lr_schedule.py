"""Learning-rate schedules (--lr-decay-style and friends): the logged lr of both trained models
follows the closed-form schedule, a resume mid-decay is exact, and a resume whose schedule
flags differ from the checkpoint's is refused before anything is built unless a flag says
which one wins."""

import math
import os
import shutil

import pytest

from test_pretrain import records, run

TINY = ["--model", "tiny", "--log-interval", "1", "--micro-batch-size", "1", "--rollout-max-steps", "1",
        "--student-update-freq", "2", "--lr", "1e-4", "--lr-fake-score", "2e-4"]
COSINE = ["--lr-decay-style", "cosine", "--lr-warmup-iters", "3", "--lr-warmup-init", "1e-5", "--min-lr", "1e-5",
          "--lr-decay-iters", "8"]


def expected_lr(step, peak, scale, *, warmup=3, init=1e-5, floor=1e-5, decay=8):
    """Linear warmup then cosine to the floor (Loshchilov & Hutter), written out independently."""
    init, floor = init * scale, floor * scale
    if step <= warmup:
        return init + (peak - init) * step / warmup
    if step > decay:
        return floor
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup)))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """10 iterations of the cosine schedule, checkpoint of iteration 4 (mid-decay) kept for the resume tests."""
    d = tmp_path_factory.mktemp("cosine")
    run(*TINY, *COSINE, "--train-iters", "10", "--log-dir", str(d), "--save", str(d / "ckpt"), "--save-interval", "4")
    return d


@pytest.fixture
def straight(straight_run):
    return records(straight_run)


def checkpoint_at_4(straight_run, ck):
    """A --save / --load folder holding only the straight run's iteration-4 checkpoint."""
    shutil.copytree(straight_run / "ckpt" / "iter_0000004", ck / "iter_0000004")
    (ck / "latest_checkpointed_iteration.txt").write_text("4")
    return str(ck)


@pytest.mark.slow
def test_both_models_follow_the_schedule(straight):
    assert [r["phase"] for r in straight[:4]] == ["critic", "student", "critic", "student"]
    for r in straight:
        step = r["iteration"] - 1  # the lr an iteration uses is set after `step` scheduler steps
        peak, scale = (1e-4, 1.0) if r["phase"] == "student" else (2e-4, 2.0)
        assert r["lr"] == pytest.approx(expected_lr(step, peak, scale), rel=1e-12), r
    assert straight[-1]["lr"] == pytest.approx(1e-5 if straight[-1]["phase"] == "student" else 2e-5)


@pytest.mark.slow
def test_resume_mid_decay_is_exact(straight_run, straight, tmp_path):
    ck = checkpoint_at_4(straight_run, tmp_path / "ckpt")
    run(*TINY, *COSINE, "--train-iters", "10", "--log-dir", str(tmp_path), "--save", ck, "--load", ck)
    resumed = records(tmp_path)
    assert [r["iteration"] for r in resumed] == list(range(5, 11))
    for a, b in zip(straight[4:], resumed):
        assert (a["lr"], a["loss"]) == (b["lr"], b["loss"]), (a, b)


@pytest.mark.slow
def test_schedule_mismatch_on_resume(straight_run, tmp_path):
    ck = checkpoint_at_4(straight_run, tmp_path / "ckpt")
    listing = sorted(os.listdir(ck))
    other = [a if a != "1e-5" else "3e-5" for a in COSINE]  # another --min-lr (and warmup init)
    p = run(*TINY, *other, "--train-iters", "6", "--log-dir", str(tmp_path / "b"), "--save", ck, "--load", ck,
            check=False)
    assert p.returncode == 2, p.stderr
    assert "min_lr=1e-05, this run's flags give 3e-05 (--min-lr)" in p.stderr, p.stderr
    assert "--override-opt_param-scheduler" in p.stderr
    assert sorted(os.listdir(ck)) == listing and not os.path.exists(tmp_path / "b" / "metrics.jsonl")

    # the run's flags win from the saved step ...
    run(*TINY, *other, "--train-iters", "6", "--log-dir", str(tmp_path / "b"), "--load", ck,
        "--override-opt_param-scheduler")
    for r in records(tmp_path / "b"):
        peak, scale = (1e-4, 1.0) if r["phase"] == "student" else (2e-4, 2.0)
        want = expected_lr(r["iteration"] - 1, peak, scale, init=3e-5, floor=3e-5)
        assert r["lr"] == pytest.approx(want, rel=1e-12), r
    # ... or the checkpoint's schedule does
    run(*TINY, *other, "--train-iters", "6", "--log-dir", str(tmp_path / "c"), "--load", ck,
        "--use-checkpoint-opt_param-scheduler")
    for r in records(tmp_path / "c"):
        peak, scale = (1e-4, 1.0) if r["phase"] == "student" else (2e-4, 2.0)
        assert r["lr"] == pytest.approx(expected_lr(r["iteration"] - 1, peak, scale), rel=1e-12), r


def test_constant_schedule_resumes_with_more_iterations():
    """The default (constant) ignores the decay length, so a run can be extended (Megatron-LM would
    refuse: --lr-decay-iters defaults to --train-iters); a decaying one cannot."""
    from rcm_megatron.training.lr_schedule import LRScheduleConfig, check_resume, schedule_fields

    for style, ok in (("constant", True), ("cosine", False)):
        cfg = LRScheduleConfig(decay_style=style)
        saved = schedule_fields(cfg, max_lr=1e-4, scale=1.0, train_iters=2)
        longer = schedule_fields(cfg, max_lr=1e-4, scale=1.0, train_iters=3)
        if ok:
            check_resume(saved, longer, cfg, "--load x")
        else:
            with pytest.raises(ValueError, match="lr_decay_steps=2, this run's flags give 3"):
                check_resume(saved, longer, cfg, "--load x")
            check_resume(saved, longer, LRScheduleConfig(decay_style=style, override=True), "--load x")


@pytest.mark.parametrize("args,message", [
    (["--lr-warmup-iters", "8", "--lr-decay-iters", "8", "--lr-decay-style", "linear"],
     "--lr-warmup-iters (8) must be smaller than --lr-decay-iters (8)"),
    (["--lr-warmup-iters", "4"], "--lr-warmup-iters (4) must be smaller than --lr-decay-iters (4, from --train-iters)"),
    (["--min-lr", "1e-3"], "--min-lr must be in [0, lr=0.0001]"),
    (["--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-warmup-fraction", "0.5", "--lr-warmup-iters", "1"], "--lr-warmup-fraction and --lr-warmup-iters"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1)"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], "exclude each other"),
])
def test_bad_schedule_flags(args, message, tmp_path):
    """Checked in parse_args, before anything is built (pretrain_rcm.py prints it and exits 2)."""
    from rcm_megatron.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError) as e:
        parse_args([*TINY, *args, "--train-iters", "4", "--log-dir", str(tmp_path)])
    assert message in str(e.value), str(e.value)
