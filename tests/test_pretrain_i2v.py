"""Image-to-video training wired end to end: batches carry the data's condition in the model's
layout, flow matching and the pipelined step take it, and pretrain_rcm.py trains an I2V teacher
file on --data toy-i2v with rCM, sCM, DMD and dCM (real processes; PP2 equals PP1). Data that
does not fit the model ends the run with one line, exit 2, before any model is built."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rcm_megatron.checkpointing.model_file import save_model_file
from rcm_megatron.data import conditions
from rcm_megatron.data.toy import TEXT_DIM
from rcm_megatron.data.toy_i2v import IMAGE_DIM, ToyI2VLatents, image_tokens
from rcm_megatron.models import WanDiT
from rcm_megatron.models.config import WanConfig
from rcm_megatron.rcm.conditioning import Conditioning
from rcm_megatron.rcm.step import Batch
from rcm_megatron.training.flow_matching import flow_matching_loss
from rcm_megatron.training.pipeline_step import concat_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, out_channels=4,
            text_dim=TEXT_DIM, freq_dim=32)
CONFIGS = {"concat": WanConfig(in_channels=12, image_dim=IMAGE_DIM, **BASE),  # Wan2.1 I2V form (mask 4)
           "ti2v": WanConfig(in_channels=4, **BASE),  # Wan2.2 TI2V form (first frame given)
           "concat-no-image": WanConfig(in_channels=12, **BASE)}  # Wan2.2 I2V expert form


def teacher_file(path, kind):
    cfg = CONFIGS[kind]
    m = WanDiT(cfg)
    m.reset_parameters(0)
    save_model_file(str(path), cfg.to_dict(), m.state_dict())
    return str(path)


def run(*args, nproc=1, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    p = subprocess.run([*launch, os.path.join(ROOT, "pretrain_rcm.py"), "--device", "cpu", "--no-memory-check",
                        *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def records(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------ in-process


def test_batch_conditioning_layouts():
    ds = ToyI2VLatents(num_samples=8, seed=2)
    raw = ds.batch([0, 3])
    assert torch.equal(raw["image_embeds"], image_tokens(raw["first_frame"]))
    assert raw["image_embeds"].shape == (2, 16, IMAGE_DIM)
    cat = conditions.batch_conditioning(raw, CONFIGS["concat"])
    assert cat.given is None and cat.concat.shape == (2, 8, *raw["latents"].shape[2:])
    assert (cat.concat[:, :4, 0] == 1).all() and (cat.concat[:, :4, 1:] == 0).all()  # mask 4, then the latents
    assert torch.equal(cat.concat[:, 4:, :1], raw["first_frame"]) and torch.equal(cat.image_context, raw["image_embeds"])
    ti2v = conditions.batch_conditioning(raw, CONFIGS["ti2v"])
    assert torch.equal(ti2v.given, raw["first_frame"]) and ti2v.concat is None and ti2v.image_context is None
    no_img = conditions.batch_conditioning(raw, CONFIGS["concat-no-image"])
    assert no_img.image_context is None and no_img.concat.shape[1] == 8
    t2v = {"latents": raw["latents"], "context": raw["context"]}
    assert conditions.batch_conditioning(t2v, CONFIGS["ti2v"]) is None
    shard_like = dict(t2v, condition=torch.randn(2, 8, *raw["latents"].shape[2:]))  # Wan's mask+latents, given
    assert torch.equal(conditions.batch_conditioning(shard_like, CONFIGS["concat-no-image"]).concat,
                       shard_like["condition"])


@pytest.mark.parametrize("fields,kind,width,dim,message", [
    ((), "concat", None, None, "has no first frame or condition latents"),
    (("first_frame",), "concat", None, None, "has no image embeddings"),
    (("first_frame", "image_embeds"), "concat", None, 8, "image embeddings are 8 wide"),
    (("condition",), "concat-no-image", 20, None, "condition has 20 channels"),
])
def test_check_names_what_does_not_fit(fields, kind, width, dim, message):
    problem = conditions.check(fields, 4, CONFIGS[kind], "--data X", condition_width=width, image_dim=dim)
    assert problem is not None and message in problem and "--data X" in problem


def test_check_accepts_fitting_data():
    for kind in CONFIGS:
        assert conditions.check(("first_frame", "image_embeds"), 4, CONFIGS[kind], "--data toy-i2v",
                                image_dim=IMAGE_DIM) is None
    assert conditions.check((), 4, CONFIGS["ti2v"], "--data toy") is None  # T2V


def test_flow_matching_leaves_the_given_frame_out():
    """TI2V: the given frame enters clean at time 0 and is not in the loss; the image tokens and
    condition channels reach the network; without a condition the loss is the plain one."""
    ds = ToyI2VLatents(num_samples=8, seed=1)
    raw = ds.batch([0, 1, 2])
    seen = {}

    def net(latents, timestep, context, image_context=None):
        seen.update(latents=latents, timestep=timestep, image_context=image_context)
        return latents[:, :4] * 0.5

    cfg = CONFIGS["ti2v"]
    cond = conditions.batch_conditioning(raw, cfg)
    loss, per = flow_matching_loss(net, raw["latents"], raw["context"], ds.negative_context[None], raw["index"],
                                   seed=3, iteration=0, cond=cond)
    assert torch.equal(seen["latents"][:, :, :1], raw["first_frame"])  # given frame clean
    assert seen["timestep"].shape == (3, 4 * 4 * 4) and (seen["timestep"][:, :16] == 0).all()
    v = seen["latents"] * 0.5
    eps_minus_x0 = (seen["latents"] - raw["latents"])  # x_s - x0 = s (eps - x0) on generated frames
    s = seen["timestep"][:, -1].double() / 1000
    target = eps_minus_x0.double() / s.view(-1, 1, 1, 1, 1)
    expect = (v.double() - target)[:, :, 1:].square().flatten(1).sum(1)
    assert torch.allclose(per.double(), expect, rtol=1e-4)
    cat = conditions.batch_conditioning(raw, CONFIGS["concat"])
    flow_matching_loss(net, raw["latents"], raw["context"], ds.negative_context[None], raw["index"], 3, 0, cond=cat)
    assert seen["latents"].shape[1] == 12 and torch.equal(seen["image_context"], raw["image_embeds"])
    plain, _ = flow_matching_loss(net, raw["latents"], raw["context"], ds.negative_context[None], raw["index"], 3, 0)
    again, _ = flow_matching_loss(net, raw["latents"], raw["context"], ds.negative_context[None], raw["index"], 3, 0,
                                  cond=Conditioning())
    assert torch.equal(plain, again)


def test_concat_batches_joins_the_conditions():
    ds = ToyI2VLatents(num_samples=8, seed=1)
    parts = []
    for idx in ([0, 1], [2, 3]):
        raw = ds.batch(idx)
        parts.append(Batch(raw["latents"], raw["context"], ds.negative_context[None], raw["index"],
                           conditions.batch_conditioning(raw, CONFIGS["concat"])))
    whole = concat_batches(parts)
    assert torch.equal(whole.cond.concat, torch.cat([p.cond.concat for p in parts]))
    assert torch.equal(whole.cond.image_context, torch.cat([p.cond.image_context for p in parts]))


# ------------------------------------------------------------------ real processes

@pytest.mark.slow
@pytest.mark.parametrize("kind,method", [("concat", "rcm"), ("ti2v", "scm"), ("concat-no-image", "dmd"),
                                         ("concat", "dcm")])
def test_pretrain_trains_an_i2v_teacher_file(kind, method, tmp_path):
    t = teacher_file(tmp_path / "teacher.pt", kind)
    log = tmp_path / "log"
    run("--teacher-checkpoint", t, "--data", "toy-i2v", "--method", method, "--train-iters", "4",
        "--micro-batch-size", "2", "--log-interval", "1", "--log-dir", str(log))
    recs = records(log)
    assert len(recs) == 4 and all(r["loss"] == r["loss"] and abs(r["loss"]) < float("inf") for r in recs)
    want = {"rcm": {"loss_scm", "loss_dmd", "loss_critic"}, "scm": {"loss_scm"}, "dmd": {"loss_dmd", "loss_critic"},
            "dcm": {"loss_dcm"}}[method]
    assert {k for r in recs for k in r if k.startswith("loss_")} == want


@pytest.mark.slow
def test_pipeline_parallel_i2v_equals_one_stage(tmp_path):
    """The image tokens travel between stages: PP2 reproduces the single-process losses."""
    t = teacher_file(tmp_path / "teacher.pt", "concat")
    common = ["--teacher-checkpoint", t, "--data", "toy-i2v", "--train-iters", "3", "--micro-batch-size", "1",
              "--global-batch-size", "2", "--log-interval", "1"]
    run(*common, "--log-dir", str(tmp_path / "pp1"))
    run(*common, "--pipeline-model-parallel-size", "2", "--log-dir", str(tmp_path / "pp2"), nproc=2)
    for a, b in zip(records(tmp_path / "pp1"), records(tmp_path / "pp2"), strict=True):
        for k in a:
            if k.startswith("loss"):
                assert b[k] == pytest.approx(a[k], rel=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("kind,data,message", [
    ("concat", "toy", "--data toy has no first frame or condition latents; the model takes an image"),
    ("concat-no-image", "synthetic", "--data synthetic has no first frame or condition latents"),
])
def test_data_that_does_not_fit_exits_2(kind, data, message, tmp_path):
    t = teacher_file(tmp_path / "teacher.pt", kind)
    p = run("--teacher-checkpoint", t, "--data", data, "--train-iters", "1", "--log-dir", str(tmp_path / "log"),
            check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "log" / "metrics.jsonl")
