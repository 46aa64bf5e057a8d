"""Toy image-to-video task: the first frame in every batch, both conditioning layouts, the
first-frame error, and a reduced distillation (tiny Wan model, TI2V layout) whose few-step
student keeps the given first frame."""

import copy

import pytest
import torch

from rcm_megatron.data.toy import LATENT_SHAPE, TEXT_DIM
from rcm_megatron.data.toy_i2v import ToyI2VLatents, conditioning, first_frame_error
from rcm_megatron.models import WanDiT
from rcm_megatron.models.config import WanConfig
from rcm_megatron.rcm.config import RCMConfig
from rcm_megatron.rcm.sampling import sample
from rcm_megatron.rcm.schedule import phase
from rcm_megatron.rcm.step import Batch, critic_step, student_step


def test_batches_hold_the_first_frame():
    ds = ToyI2VLatents(num_samples=16, seed=3)
    b = ds.batch([0, 5, 9])
    assert torch.equal(b["first_frame"], b["latents"][:, :, :1])
    assert torch.equal(ds[5]["first_frame"], b["first_frame"][1])


def test_conditioning_layouts():
    ff = ToyI2VLatents(num_samples=4).batch([0, 1])["first_frame"].double()
    ti2v = conditioning(ff, LATENT_SHAPE, "ti2v")
    assert torch.equal(ti2v.given, ff) and ti2v.concat is None
    cat = conditioning(ff, LATENT_SHAPE, "concat", mask_channels=2).concat
    c, t, h, w = LATENT_SHAPE
    assert cat.shape == (2, 2 + c, t, h, w)
    assert (cat[:, :2, 0] == 1).all() and (cat[:, :2, 1:] == 0).all()
    assert torch.equal(cat[:, 2:, :1], ff) and (cat[:, 2:, 1:] == 0).all()
    with pytest.raises(ValueError, match="layout"):
        conditioning(ff, LATENT_SHAPE, "sideways")
    with pytest.raises(ValueError, match="first_frame"):
        conditioning(ff[:, :2], LATENT_SHAPE)


def test_first_frame_error():
    x = torch.randn(3, *LATENT_SHAPE, dtype=torch.float64)
    ff = x[:, :, :1].clone()
    assert (first_frame_error(x, ff) == 0).all()
    y = x.clone()
    y[1, :, 0] += 0.1 * ff[1, :, 0].square().mean().sqrt()
    err = first_frame_error(y, ff)
    assert err[0] == 0 and err[2] == 0 and abs(err[1].item() - 0.1) < 1e-12


@pytest.mark.slow
def test_reduced_distillation_keeps_the_first_frame():
    """A few rCM iterations (student and critic) on the toy I2V task, TI2V layout: the losses are
    finite, the student moves, and its 1- and 4-step samples keep the given first frame exactly
    while generating the other frames."""
    cfg_model = WanConfig(num_layers=1, hidden_size=64, ffn_hidden_size=96, num_attention_heads=2, in_channels=4,
                          out_channels=4, text_dim=TEXT_DIM, freq_dim=32)
    teacher = WanDiT(cfg_model)
    teacher.reset_parameters(0)
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    cfg = RCMConfig(rollout_max_steps=2, student_update_freq=2, lr_student=1e-3, lr_fake_score=1e-3)
    adamw = dict(betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    opts = {"student": torch.optim.AdamW(student.parameters(), lr=cfg.lr_student, **adamw),
            "fake_score": torch.optim.AdamW(fake.parameters(), lr=cfg.lr_fake_score, **adamw)}
    ds = ToyI2VLatents(num_samples=64, seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    for it in range(6):
        raw = ds.batch(range(4 * it, 4 * it + 4))
        b = Batch(raw["latents"], raw["context"], ds.negative_context[None], raw["index"],
                  conditioning(raw["first_frame"], LATENT_SHAPE))
        ph = phase(cfg, it)
        if ph.is_student:
            out, which = student_step(cfg, teacher, student, fake, b, it), "student"
        else:
            out, which = critic_step(cfg, student, fake, b, it), "fake_score"
        assert all(torch.isfinite(v) for v in out.values())
        opts[which].step()
        opts[which].zero_grad(set_to_none=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    raw = ds.batch(range(100 - 64, 100 - 60))
    cond = conditioning(raw["first_frame"], LATENT_SHAPE)
    for steps in (1, 4):
        x = sample(student, raw["context"], LATENT_SHAPE, raw["index"], seed=5, num_steps=steps, cond=cond)
        assert (first_frame_error(x, raw["first_frame"]) == 0).all()
        assert torch.isfinite(x).all() and (x[:, :, 1:] - raw["latents"][:, :, 1:]).abs().max() > 0


@pytest.mark.slow
def test_toy_i2v_benchmark_smoke(tmp_path):
    """benchmarks/toy_i2v_quality.py --tiny end to end (widened teacher fine-tuned, rCM, evaluation): every
    row has an FD and a first-frame error, and the targets are computed from them."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "toy_i2v_quality.py"), "--out", str(tmp_path),
                        "--tiny"], capture_output=True, text=True, cwd=root, timeout=900,
                       env=dict(os.environ, PYTHONPATH=root, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((tmp_path / "toy_i2v_quality.json").read_text())
    assert set(res["rows"]) == {"teacher", "rcm_1step", "rcm_2step", "rcm_4step"}
    for row in res["rows"].values():
        assert row["fd"] >= 0 and 0 <= row["first_frame_error"] < float("inf")
    t, s = res["rows"]["teacher"], res["rows"]["rcm_4step"]
    assert res["targets"]["fd_4step_over_teacher"] == pytest.approx(s["fd"] / t["fd"])
    assert res["targets"]["fd_met"] == (s["fd"] <= 2 * t["fd"])
