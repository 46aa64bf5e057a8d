"""tools/generate.py --image (real processes): an I2V student trained on --data toy-i2v samples
from a given first frame (a .pt of condition fields) exactly as the library sampler does with the
same condition, the teacher comparison gets the condition too, a TI2V student keeps the given
frame exactly; a missing or misplaced --image exits 2 with one line before any model is built."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rcm_megatron.checkpointing.loading import open_model
from rcm_megatron.checkpointing.model_file import save_model_file
from rcm_megatron.data.conditions import batch_conditioning
from rcm_megatron.data.toy import LATENT_SHAPE, TEXT_DIM
from rcm_megatron.data.toy_i2v import IMAGE_DIM, ToyI2VLatents, image_tokens
from rcm_megatron.eval.generation_settings import toy_contexts
from rcm_megatron.models import WanDiT
from rcm_megatron.models.config import WanConfig
from rcm_megatron.rcm.sampling import sample

pytestmark = pytest.mark.slow  # every test trains or samples in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, out_channels=4,
            text_dim=TEXT_DIM, freq_dim=32)


def run(script, *args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def trained(tmp_path, cfg, name):
    """A student checkpoint after 2 rCM iterations on --data toy-i2v, and its teacher file."""
    m = WanDiT(cfg)
    m.reset_parameters(0)
    teacher = str(tmp_path / f"{name}_teacher.pt")
    save_model_file(teacher, cfg.to_dict(), m.state_dict())
    ckpt = str(tmp_path / f"{name}_ckpt")
    run("pretrain_rcm.py", "--teacher-checkpoint", teacher, "--data", "toy-i2v", "--device", "cpu", "--no-memory-check",
        "--train-iters", "2", "--micro-batch-size", "2", "--student-update-freq", "1", "--log-dir",
        str(tmp_path / f"{name}_log"), "--save", ckpt)
    return teacher, ckpt


def first_frames(tmp_path, n=2):
    raw = ToyI2VLatents(num_samples=8, seed=11).batch(range(n))
    paths = []
    for i in range(n):
        p = tmp_path / f"frame{i}.pt"
        torch.save({"first_frame": raw["first_frame"][i]}, p)
        paths.append(str(p))
    return raw, paths


def expected(ckpt, got, cfg, first_frame, teacher=None):
    """What rcm.sampling.sample gives for the checkpoint's EMA student with the same condition."""
    student, _ = open_model(ckpt, weights="ema")
    _, ctx, _ = toy_contexts()
    n = ctx.shape[0]
    ff = first_frame[None].expand(n, *first_frame.shape)
    cond = batch_conditioning({"first_frame": ff, "image_embeds": image_tokens(ff),
                               "latents": torch.zeros(n, *LATENT_SHAPE)}, cfg)
    return sample(student, ctx, LATENT_SHAPE, list(range(n)), seed=got["seed"], num_steps=got["steps"],
                  mid_times=tuple(got["mid_times"]), sigma_max=got["sigma_max"], cond=cond), cond


def test_generate_i2v_matches_the_library_sampler(tmp_path):
    cfg = WanConfig(in_channels=12, image_dim=IMAGE_DIM, **BASE)
    teacher, ckpt = trained(tmp_path, cfg, "i2v")
    raw, frames = first_frames(tmp_path)
    out = tmp_path / "out"
    run("tools/generate.py", "--load", ckpt, "--image", frames[0], "--steps", "2", "--teacher-steps", "2",
        "--sampler", "euler", "--teacher", teacher, "--seed", "3", "--out", str(out))
    got = torch.load(out / "latents.pt", weights_only=False)
    want, cond = expected(ckpt, got, cfg, raw["first_frame"][0])
    torch.testing.assert_close(got["student"].double(), want.double(), rtol=1e-4, atol=1e-4)
    # the teacher comparison is conditioned too: without the condition its samples differ
    from rcm_megatron.rcm.teacher_sampling import euler_sample
    from rcm_megatron.rcm.rng import KeyedRNG

    t, _ = open_model(teacher)
    _, ctx, neg = toy_contexts()
    idx = list(range(ctx.shape[0]))
    noise = KeyedRNG(3, 0).normal("sample.noise", idx, LATENT_SHAPE)
    kw = dict(seed=3, num_steps=2, guidance_scale=got["teacher_sampler"]["guidance_scale"],
              shift=got["teacher_sampler"]["shift"], noise=noise)
    torch.testing.assert_close(got["teacher"].double(), euler_sample(t, ctx, neg, LATENT_SHAPE, idx, cond=cond, **kw).double(),
                               rtol=1e-4, atol=1e-4)


def test_generate_ti2v_keeps_the_given_frame(tmp_path):
    cfg = WanConfig(in_channels=4, **BASE)
    _, ckpt = trained(tmp_path, cfg, "ti2v")
    raw, frames = first_frames(tmp_path, 4)
    out = tmp_path / "out"
    run("tools/generate.py", "--load", ckpt, *[a for f in frames for a in ("--image", f)], "--steps", "1",
        "--out", str(out))
    got = torch.load(out / "latents.pt", weights_only=False)["student"]
    assert torch.equal(got[:, :, :1].float(), raw["first_frame"].float())  # one frame per prompt, kept exactly


@pytest.mark.parametrize("case,message", [
    ("t2v_with_image", "is a text-to-video model (in_channels = out_channels = 4, no image branch)"),
    ("i2v_without_image", "--image PATH is needed"),
    ("image_file_without_vae", "--vae PATH is needed to encode the image"),
    ("three_images", "3 --image for 4 prompts"),
])
def test_generate_bad_image_input_exits_2(tmp_path, case, message):
    t2v = WanConfig(in_channels=4, **BASE)
    i2v = WanConfig(in_channels=12, image_dim=IMAGE_DIM, **BASE)
    cfg = t2v if case == "t2v_with_image" else i2v
    m = WanDiT(cfg)
    save_model_file(str(tmp_path / "m.pt"), cfg.to_dict(), m.state_dict())
    _, frames = first_frames(tmp_path, 3)
    png = tmp_path / "img.png"
    png.write_bytes(b"not read before the check")
    image = {"t2v_with_image": ["--image", frames[0]], "i2v_without_image": [],
             "image_file_without_vae": ["--image", str(png)],
             "three_images": [a for f in frames for a in ("--image", f)]}[case]
    p = run("tools/generate.py", "--load", str(tmp_path / "m.pt"), *image, "--latent-shape", *map(str, LATENT_SHAPE),
            "--context-file", str(ctx_file(tmp_path)), "--latents-only", "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "o")


def ctx_file(tmp_path):
    _, ctx, _ = toy_contexts()
    path = tmp_path / "ctx.pt"
    torch.save({"context": ctx}, path)
    return path
