"""tools/generate.py on tiny random models (a diffusers student and teacher built here; the
AutoencoderKLWan and the UMT5 encoder with its offline word-level tokenizer from test_prepare_data):
the tool's latents are the library samplers' latents, TP=2 (+SP) x CP=2 reproduces TP=1, videos
and the contact sheet are written, bad input exits 2. And the UniPC teacher sampler against an
exactly solvable flow; the exported student inside diffusers' WanPipeline with RCMFlowMatchScheduler."""

import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from distributed_utils import run_distributed  # noqa: E402
from test_convert_checkpoint import load_tool, tiny_diffusers_model  # noqa: E402
from test_prepare_data import TEXT_DIM as ENCODER_DIM, models  # noqa: E402,F401 - the tiny VAE / umT5 fixture

from rcm_megatron.parallel.config import ParallelConfig  # noqa: E402

TEXT_DIM = 16  # = the tiny DiT's text_dim (test_convert_checkpoint.TINY)
assert ENCODER_DIM == TEXT_DIM


@pytest.fixture(scope="module")
def assets(models, tmp_path_factory):
    """test_prepare_data's tiny Wan-pipeline folder (vae/ with z_dim 4, text_encoder/ and tokenizer/ with
    width 16) as pipe/, plus a student and a teacher DiT."""
    root = tmp_path_factory.mktemp("gen")
    os.symlink(models, root / "pipe")
    tiny_diffusers_model(seed=1).save_pretrained(root / "student")
    tiny_diffusers_model(seed=2).save_pretrained(root / "teacher")
    return root


def common(assets, out, *extra):
    return ["--prompt", "a red ball runs in the park", "--prompt", "a cat jumps", "--text-encoder",
            str(assets / "pipe"), "--num-frames", "5", "--height", "32", "--width", "32", "--steps", "2",
            "--seed", "7", "--out", str(out), *extra]


def contexts(assets, prompts, text_len=512):
    from rcm_megatron.data.encoders import WAN_NEGATIVE_PROMPT, UMT5TextEncoder

    enc = UMT5TextEncoder(str(assets / "pipe"))
    embs = enc.encode(prompts + [WAN_NEGATIVE_PROMPT])
    padded = torch.zeros(len(embs), text_len, TEXT_DIM)
    for i, e in enumerate(embs):
        padded[i, :len(e)] = e
    return padded[:-1], padded[-1:]


@pytest.mark.slow
def test_generate_student_and_teacher(assets, tmp_path, capsys):
    import av

    from rcm_megatron.convert import load_diffusers_wan
    from rcm_megatron.rcm.rng import KeyedRNG
    from rcm_megatron.rcm.sampling import sample
    from rcm_megatron.rcm.unipc import unipc_sample

    gen = load_tool("generate")
    out = tmp_path / "out"
    assert gen.main(["--hf-dir", str(assets / "student"), "--vae", str(assets / "pipe"), "--teacher-steps", "3",
                     "--sampler", "unipc", "--teacher", str(assets / "teacher"), "--batch-size", "2",
                     *common(assets, out)]) == 0
    res = torch.load(out / "latents.pt")
    assert res["student"].shape == (2, 4, 2, 4, 4) and res["teacher"].shape == (2, 4, 2, 4, 4)

    # The tool computes exactly what the library samplers compute (teacher: from the student's noise).
    ctx, neg = contexts(assets, res["prompts"])
    student = load_diffusers_wan(str(assets / "student")).eval()
    want = sample(student, ctx, (4, 2, 4, 4), [0, 1], seed=7, num_steps=2)
    torch.testing.assert_close(res["student"], want, rtol=1e-5, atol=1e-5)
    teacher = load_diffusers_wan(str(assets / "teacher")).eval()
    noise = KeyedRNG(7, 0).normal("sample.noise", [0, 1], (4, 2, 4, 4))
    want = unipc_sample(teacher, ctx, neg, (4, 2, 4, 4), [0, 1], seed=7, num_steps=3, noise=noise)
    torch.testing.assert_close(res["teacher"], want, rtol=1e-5, atol=1e-5)

    for name in ("student_0", "student_1", "teacher_0", "teacher_1"):
        with av.open(str(out / f"{name}.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    from PIL import Image

    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (5 * 34 + 2, 4 * 34 + 2)  # 5 frames across, 2 prompts x (student, teacher) down
    assert "contact sheet rows: 0: student 0, 1: teacher 0, 2: student 1, 3: teacher 1" in capsys.readouterr().out


def _generate_rank(argv):
    gen = load_tool("generate")
    return gen.main(argv)


@pytest.mark.slow
def test_generate_tp2_cp2_from_checkpoint_matches_tp1(assets, tmp_path):
    """4 ranks: TP 2 (+ sequence parallel) x CP 2 (ring attention), the student read from an imported checkpoint."""
    cc = load_tool("convert_checkpoint")
    ck = str(tmp_path / "ck")
    assert cc.main(["import", "--hf-dir", str(assets / "student"), "--save", ck]) == 0
    one, four = tmp_path / "tp1", tmp_path / "tp2cp2"
    gen = load_tool("generate")
    assert gen.main(["--hf-dir", str(assets / "student"), "--latents-only", *common(assets, one)]) == 0
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
              "--cp-comm-type", "p2p"]
    codes = run_distributed(_generate_rank, 4, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                                              context_parallel_size=2, cp_comm_type="p2p"),
                            ["--load", ck, "--latents-only", *layout, *common(assets, four)])
    assert codes == [0, 0, 0, 0]
    a, b = torch.load(one / "latents.pt"), torch.load(four / "latents.pt")
    torch.testing.assert_close(b["student"], a["student"], rtol=1e-5, atol=1e-5)
    assert (four / "contact_sheet.png").exists() and not (four / "student_0.mp4").exists()


@pytest.mark.slow
def test_generate_bad_input(assets, tmp_path, capsys):
    gen = load_tool("generate")

    def err(*argv):
        assert gen.main(list(argv)) == 2
        return capsys.readouterr().err

    base = ["--hf-dir", str(assets / "student")]
    assert "--steps 5: expected 1..4" in err(*base, "--latents-only", *common(assets, tmp_path / "o"), "--steps", "5")
    assert "--vae PATH is needed" in err(*base, *common(assets, tmp_path / "o"))
    assert "--teacher-steps needs a teacher" in err(*base, "--latents-only", "--teacher-steps", "2",
                                                    *common(assets, tmp_path / "o"))
    assert "--pipeline-model-parallel-size > 1 is not supported" in err(
        *base, "--latents-only", "--pipeline-model-parallel-size", "2", *common(assets, tmp_path / "o"))
    assert "multiples of the VAE's spatial factor 8" in err(*base, "--vae", str(assets / "pipe"),
                                                            *common(assets, tmp_path / "o"), "--height", "36")
    wide = tmp_path / "wide"
    tiny_diffusers_model(text_dim=32).save_pretrained(wide)
    assert "the model's text_dim is 32" in err("--hf-dir", str(wide), "--latents-only", *common(assets, tmp_path / "o"))
    assert "no config.json" in err("--hf-dir", str(tmp_path), "--latents-only", *common(assets, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_unipc_solves_a_gaussian_flow_better_than_euler():
    """Data N(mu, sd^2) per element: the flow's exact velocity is known in closed form and its ODE maps
    eps to mu + sd * eps. UniPC (diffusers' scheduler on the flow) is far more accurate than Euler."""
    from rcm_megatron.rcm.rng import KeyedRNG
    from rcm_megatron.rcm.teacher_sampling import euler_sample
    from rcm_megatron.rcm.unipc import unipc_sample

    mu, sd = 0.7, 1.0

    class GaussianFlow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x, t, ctx):
            s = (t.double() / 1000).view(-1, 1, 1, 1, 1)
            var = (1 - s) ** 2 * sd ** 2 + s ** 2
            r = x.double() - (1 - s) * mu
            return s / var * r - (mu + (1 - s) * sd ** 2 / var * r)  # E[eps | x_s] - E[x0 | x_s]

    ctx, shape = torch.zeros(2, 3, 4, dtype=torch.float64), (1, 2, 4, 4)
    exact = mu + sd * KeyedRNG(0, 0).normal("teacher.noise", [0, 1], shape)
    errors = {}
    for n in (10, 20):
        kw = dict(seed=0, num_steps=n, shift=1.0, guidance_scale=1.0)
        errors[n] = [(f(GaussianFlow(), ctx, None, shape, [0, 1], **kw) - exact).abs().max().item()
                     for f in (euler_sample, unipc_sample)]
    assert errors[10][1] < 0.2 * errors[10][0] and errors[20][1] < 0.2 * errors[20][0], errors
    assert errors[20][1] < errors[10][1] < 0.1, errors


@pytest.mark.slow
def test_exported_student_runs_in_wan_pipeline(assets):
    """diffusers' WanPipeline with the exported student and RCMFlowMatchScheduler samples rCM's schedule:
    one step from rCM's starting state equals our sampler; four steps decode to a video."""
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from rcm_megatron.convert import load_diffusers_wan
    from rcm_megatron.convert.diffusers_scheduler import RCMFlowMatchScheduler, initial_latents
    from rcm_megatron.rcm.rng import KeyedRNG
    from rcm_megatron.rcm.sampling import sample
    from test_convert_checkpoint import from_pretrained

    student = from_pretrained(str(assets / "student"))
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(assets / "pipe" / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(assets / "pipe" / "text_encoder"),
                       vae=AutoencoderKLWan.from_pretrained(assets / "pipe" / "vae"), transformer=student,
                       scheduler=RCMFlowMatchScheduler())
    pipe.scheduler.set_timesteps(3)
    assert [round(s, 4) for s in pipe.scheduler.sigmas.tolist()] == [0.9877, 0.9338, 0.8529, 0.0]
    ctx, _ = contexts(assets, ["a red ball runs"])
    noise = KeyedRNG(7, 0).normal("sample.noise", [0], (4, 2, 4, 4))
    size = dict(height=32, width=32, num_frames=5, guidance_scale=1.0)
    got = pipe(prompt_embeds=ctx, num_inference_steps=1, latents=initial_latents(noise).float(), output_type="latent",
               **size).frames
    want = sample(load_diffusers_wan(student).eval(), ctx, (4, 2, 4, 4), [0], seed=7, num_steps=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    video = pipe(prompt_embeds=ctx, num_inference_steps=4, output_type="np", **size).frames
    assert video.shape == (1, 5, 32, 32, 3)
