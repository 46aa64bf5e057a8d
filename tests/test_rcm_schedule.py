"""Phase of each iteration and the tangent warmup ratio."""

import pytest

from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.schedule import phase, tangent_warmup_ratio


def kinds(cfg, n):
    return [(p.model, p.losses) for p in (phase(cfg, i) for i in range(n))]


def test_rcm_warmup_then_alternation():
    cfg = RCMConfig(method="rcm", tangent_warmup_iters=3, student_update_freq=4)
    got = kinds(cfg, 12)
    assert got[:3] == [("student", ("scm",))] * 3
    student_iters = [i for i, (m, _) in enumerate(got) if m == "student" and i >= 3]
    assert student_iters == [6, 10]  # F - 1 = 3 critic steps first, then one student step
    assert all(got[i] == ("student", ("scm", "dmd")) for i in student_iters)
    assert all(got[i] == ("critic", ()) for i in (3, 4, 5, 7, 8, 9, 11))


def test_pure_modes():
    assert set(kinds(RCMConfig(method="scm", tangent_warmup_iters=5), 20)) == {("student", ("scm",))}
    assert set(kinds(RCMConfig(method="dcm"), 20)) == {("student", ("dcm",))}
    dmd = kinds(RCMConfig(method="dmd", student_update_freq=5, tangent_warmup_iters=7), 10)
    assert [i for i, (m, _) in enumerate(dmd) if m == "student"] == [4, 9]
    assert dmd[4] == ("student", ("dmd",))


def test_student_every_iteration_with_freq_one():
    assert {p.model for p in (phase(RCMConfig(student_update_freq=1), i) for i in range(5))} == {"student"}


def test_warmup_ratio():
    cfg = RCMConfig(tangent_warmup_iters=10)
    assert [tangent_warmup_ratio(cfg, i) for i in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert tangent_warmup_ratio(RCMConfig(), 0) == 1.0
    with pytest.raises(ValueError, match="iteration"):
        phase(cfg, -1)
