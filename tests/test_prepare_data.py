"""tools/prepare_data.py and tools/synthesize_data.py end to end on tiny inputs made here:
videos written with PyAV, a tiny random AutoencoderKLWan, a tiny UMT5 encoder with an
offline word-level tokenizer, a tiny teacher. Nothing is downloaded."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("webdataset")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from rcm_megatron.data.shards import INDEX_SUFFIX, ShardDataset, ShardLoader, shard_name  # noqa: E402
from rcm_megatron.data.video import (  # noqa: E402
    TooFewFrames, VideoError, check_frame_count, read_video, resize_center_crop, sample_indices,
)
from rcm_megatron.rcm.teacher_sampling import euler_sample, shifted_sigmas  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "<pad> </s> <unk> a red green ball cat dog runs jumps in the park bad quality".split()
TEXT_DIM = 16


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_video(path, num_frames, size=(16, 16), fps=8, codec="mpeg4", seed=0):
    g = torch.Generator().manual_seed(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = size[1], size[0]
        s.pix_fmt = "yuv420p"
        for i in range(num_frames):
            img = torch.zeros(size[0], size[1], 3, dtype=torch.uint8)
            img[..., 0] = (i * 20) % 256  # frame i is recognizable by its red level
            img[..., 1] = (torch.rand(size, generator=g) * 50).to(torch.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img.numpy(), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A Wan-pipeline-shaped folder: vae/, text_encoder/, tokenizer/ (tiny, random)."""
    from tiny_wan_assets import write_tiny_wan_folder

    return write_tiny_wan_folder(tmp_path_factory.mktemp("wan"), WORDS, TEXT_DIM)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    rows = []
    for i in range(5):
        write_video(d / f"v{i}.mp4", 12, size=(16, 24) if i == 1 else (16, 16), seed=i)
        rows.append({"video": f"v{i}.mp4", "caption": f"a red ball runs in the park {i}"})
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    write_video(d / "short.mp4", 3)
    rows.insert(2, {"video": "broken.mp4", "caption": "a cat"})
    rows.insert(4, {"video": "short.mp4", "caption": "a dog"})
    rows.append({"video": "v0.mp4", "caption": ""})  # missing caption
    with open(d / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return d


# ----------------------------------------------------------------------------- decode / resize
def test_decode_sampling_and_errors(videos):
    frames = read_video(str(videos / "v0.mp4"), 9)
    assert frames.shape == (9, 16, 16, 3) and frames.dtype == torch.uint8
    red = frames[:, :, :, 0].float().mean((1, 2))
    assert torch.allclose(red, torch.arange(9) * 20.0, atol=6)  # frames 0..8 in order
    half = read_video(str(videos / "v0.mp4"), 5, target_fps=4)  # 8 fps source -> every 2nd frame
    assert torch.allclose(half[:, :, :, 0].float().mean((1, 2)), torch.arange(5) * 40.0, atol=6)
    assert sample_indices(4, 24, 16) == [0, 2, 3, 5] and sample_indices(3, None, 16) == [0, 1, 2]
    with pytest.raises(TooFewFrames, match="short.mp4: 3 frames, a clip of 5 frames needs 5"):
        read_video(str(videos / "short.mp4"), 5)
    with pytest.raises(VideoError, match="broken.mp4: cannot decode"):
        read_video(str(videos / "broken.mp4"), 5)
    with pytest.raises(VideoError, match="nope.mp4: no such file"):
        read_video(str(videos / "nope.mp4"), 5)
    check_frame_count(81)
    with pytest.raises(ValueError, match="4k\\+1 frames \\(e.g. 77 or 81\\)"):
        check_frame_count(80)


def test_dali_decoder_matches_pyav_and_falls_back(tmp_path):
    """Optional (DALI is not a test dependency): its CPU decoder takes VP9; mpeg4 falls back to PyAV."""
    pytest.importorskip("nvidia.dali")
    write_video(tmp_path / "v.webm", 12, codec="libvpx-vp9")
    a = read_video(str(tmp_path / "v.webm"), 5, 4, backend="dali")
    b = read_video(str(tmp_path / "v.webm"), 5, 4, backend="pyav")
    assert a.shape == b.shape == (5, 16, 16, 3) and (a.float() - b.float()).abs().max() <= 12
    write_video(tmp_path / "v.mp4", 12)
    assert read_video(str(tmp_path / "v.mp4"), 5, backend="dali").shape == (5, 16, 16, 3)


def test_resize_center_crop():
    f = torch.zeros(2, 20, 40, 3, dtype=torch.uint8)
    f[:, :, 15:25] = 255  # a bright vertical band in the middle
    out = resize_center_crop(f, 8, 8)  # scale 20x40 -> 8x16, crop the middle 8 columns
    assert out.shape == (3, 2, 8, 8) and out.min() >= -1 and out.max() <= 1
    assert out[:, :, :, 3:5].mean() > 0.9 and out[:, :, :, 0].mean() < -0.5
    up = resize_center_crop(torch.full((1, 4, 4, 3), 255, dtype=torch.uint8), 8, 12)
    assert up.shape == (3, 1, 8, 12) and torch.allclose(up, torch.ones_like(up))


# ----------------------------------------------------------------------------- prepare_data
def prepare(tmp, models, videos, *extra):
    tool = load_tool("prepare_data")
    return tool.main(["--input", str(videos / "manifest.jsonl"), "--output", str(tmp), "--vae", str(models),
                      "--text-encoder", str(models), "--num-frames", "5", "--height", "16", "--width", "16",
                      "--fps", "0", "--samples-per-shard", "3", "--text-len", "12", "--latent-dtype", "float32",
                      "--negative-prompt", "bad quality", "--device", "cpu", "--log-interval", "0", *extra])


@pytest.mark.slow
def test_prepare_end_to_end_bad_input_and_resume(tmp_path, models, videos, capfd):
    out = tmp_path / "shards"
    assert prepare(out, models, videos) == 0
    log = capfd.readouterr()
    assert "\r" not in log.out and "\r" not in log.err
    assert "broken.mp4: cannot decode" in log.err and "too few frames" in log.err and "missing caption" in log.err
    assert "5 ok, 3 bad (no_caption 1, too_short 1, unreadable 1)" in log.out
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == [shard_name(s) for s in range(3)]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["latent_shape"] == [4, 2, 2, 2] and meta["text_dim"] == TEXT_DIM and meta["text_len"] == 12
    ds = ShardDataset(str(out))
    assert ds.counts == [2, 2, 1] and len(ds) == 5  # rows 0,1 | (2 broken) 3,(4 short) | 5,(6 no caption)
    # sample 0 = the tiny VAE's normalized posterior mean of the cropped clip; context = umT5 of its caption
    from rcm_megatron.data.encoders import UMT5TextEncoder, WanVAEEncoder

    vae, text = WanVAEEncoder(str(models)), UMT5TextEncoder(str(models), max_length=12)
    clip = resize_center_crop(read_video(str(videos / "v0.mp4"), 5), 16, 16)
    torch.testing.assert_close(ds[0]["latents"], vae.encode(clip[None])[0], rtol=1e-5, atol=1e-5)
    emb = text.encode(["a red ball runs in the park 0"])[0]
    assert emb.shape == (9, TEXT_DIM)  # 8 words + </s>
    torch.testing.assert_close(ds[0]["context"][:9], emb)
    assert ds[0]["context"][9:].abs().sum() == 0 and ds[0]["prompt"] == "a red ball runs in the park 0"
    torch.testing.assert_close(ds.negative_context[:3], text.encode(["bad quality"])[0])
    # the wide video was center-cropped; the loader reads the shards
    assert ds[1]["latents"].shape == (4, 2, 2, 2)
    ld = ShardLoader(str(out), 0, 1, 2, 0)
    assert ld.next_batch()["latents"].shape == (2, 4, 2, 2, 2)
    ld.close()
    # resume: complete shards are skipped, a missing one is rewritten identically
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(".tar")}
    blob = (out / shard_name(1)).read_bytes()
    os.remove(out / shard_name(1))
    (out / (shard_name(2) + ".tmp.999")).write_bytes(b"partial")  # a crashed writer's leftover is ignored
    assert prepare(out, models, videos) == 0
    log = capfd.readouterr().out
    assert "(2 already complete)" in log and "shard 3/3" in log
    assert os.path.getmtime(out / shard_name(0)) == before[shard_name(0)]
    assert (out / shard_name(1)).read_bytes() == blob
    assert os.path.isfile(out / (shard_name(1) + INDEX_SUFFIX))


@pytest.mark.slow
def test_prepare_nothing_valid_and_config_errors(tmp_path, models, videos, capfd):
    bad = tmp_path / "bad.csv"
    bad.write_text("video,caption\nbroken.mp4,a cat\nshort.mp4,a dog\n")
    os.symlink(videos / "broken.mp4", tmp_path / "broken.mp4")
    os.symlink(videos / "short.mp4", tmp_path / "short.mp4")
    tool = load_tool("prepare_data")
    base = ["--output", str(tmp_path / "o"), "--vae", str(models), "--text-encoder", str(models), "--device", "cpu",
            "--height", "16", "--width", "16", "--text-len", "8", "--fps", "0"]
    assert tool.main(["--input", str(bad), "--num-frames", "5", *base]) == 1
    assert f"no valid sample in --input {bad}: all 2 rows were skipped" in capfd.readouterr().err
    # the output already holds a dataset of another shape: refused before anything is written
    assert tool.main(["--input", str(bad), "--num-frames", "5", *base, "--height", "32"]) == 2  # last flag wins
    assert "existing dataset has latent_shape=[4, 2, 2, 2], this run would write [4, 2, 4, 2]" in capfd.readouterr().err
    assert tool.main(["--input", str(bad), "--num-frames", "8", *base]) == 2
    assert "--num-frames 8: the Wan VAE needs 4k+1 frames" in capfd.readouterr().err
    assert tool.main(["--input", str(tmp_path / "none.csv"), *base]) == 2
    assert "none.csv: no such file or directory" in capfd.readouterr().err
    (tmp_path / "cols.csv").write_text("clip,caption\na.mp4,x\n")
    assert tool.main(["--input", str(tmp_path / "cols.csv"), *base]) == 2
    assert "no video column" in capfd.readouterr().err


@pytest.mark.slow
def test_prepare_two_ranks_with_torchrun(tmp_path, models, videos):
    """Each rank writes its own shards; together they equal the single-process output."""
    out = tmp_path / "dist"
    with socket.socket() as sock:  # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           os.path.join(ROOT, "tools", "prepare_data.py"), "--input", str(videos / "manifest.jsonl"),
           "--output", str(out), "--vae", str(models), "--text-encoder", str(models), "--num-frames", "5",
           "--height", "16", "--width", "16", "--fps", "0", "--samples-per-shard", "3", "--text-len", "12",
           "--latent-dtype", "float32", "--negative-prompt", "bad quality", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[prepare 0/2]" in p.stdout and "[prepare 1/2]" in p.stdout and "holds 5 samples" in p.stdout
    ref = tmp_path / "ref"
    assert prepare(ref, models, videos) == 0
    for s in range(3):
        assert (out / shard_name(s)).read_bytes() == (ref / shard_name(s)).read_bytes()


# ----------------------------------------------------------------------------- teacher sampling
class PointMass(torch.nn.Module):
    """The exact rectified-flow velocity when all data sit at x0 = context's first value:
    v(x, s) = (x - x0) / s. Euler is exact on it for any grid, so samples must equal x0."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, timestep, context):
        s = (timestep.to(torch.float64) / 1000).view(-1, 1, 1, 1, 1)
        target = context[:, 0, 0].to(torch.float64).view(-1, 1, 1, 1, 1)
        return (x - target) / s


def test_euler_sampler_exact_on_point_mass_with_cfg():
    ctx = torch.tensor([2.0, -1.0], dtype=torch.float64).view(2, 1, 1).expand(2, 3, 4)
    neg = torch.full((1, 3, 4), 0.5, dtype=torch.float64)
    out = euler_sample(PointMass(), ctx, neg, (2, 1, 2, 2), [3, 7], seed=0, num_steps=7, guidance_scale=4.0, shift=3.0)
    want = 0.5 + 4.0 * (ctx[:, 0, 0] - 0.5)  # guided velocity = point mass at v_u + w (v_c - v_u)
    torch.testing.assert_close(out, want.view(2, 1, 1, 1, 1).expand_as(out), rtol=1e-9, atol=1e-9)
    sig = shifted_sigmas(4, 3.0)
    assert sig[0] == 1 and sig[-1] == 0 and math.isclose(float(sig[1]), 3 * 0.75 / (1 + 2 * 0.75))


def test_euler_sampler_noise_keyed_by_index():
    net = torch.nn.Linear(1, 1).double()

    class Damp(torch.nn.Module):  # v = x: a nontrivial, sample-independent flow
        def __init__(self):
            super().__init__()
            self.lin = net

        def forward(self, x, t, c):
            return x

    ctx = torch.zeros(3, 2, 2, dtype=torch.float64)
    a = euler_sample(Damp(), ctx, None, (1, 1, 2, 2), [5, 6, 7], seed=1, num_steps=3)
    b = euler_sample(Damp(), ctx[:1], None, (1, 1, 2, 2), [6], seed=1, num_steps=3)
    torch.testing.assert_close(a[1:2], b)  # sample 6 is the same alone or in a batch
    assert not torch.allclose(a[0], a[1])


# ----------------------------------------------------------------------------- synthesize_data
@pytest.mark.slow
def test_synthesize_end_to_end_and_resume(tmp_path, models, capfd):
    from rcm_megatron.data.encoders import UMT5TextEncoder
    from rcm_megatron.models import WanConfig, WanDiT
    from rcm_megatron.checkpointing.model_file import save_model_file

    cfg = WanConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, in_channels=4,
                    out_channels=4, text_dim=TEXT_DIM)
    teacher = WanDiT(cfg)
    teacher.reset_parameters(seed=3)
    save_model_file(str(tmp_path / "teacher.pt"), cfg.to_dict(), teacher.state_dict())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat runs\n\na dog jumps in the park\n")
    out = tmp_path / "synth"
    tool = load_tool("synthesize_data")
    args = ["--prompts", str(prompts), "--output", str(out), "--teacher-checkpoint", str(tmp_path / "teacher.pt"),
            "--text-encoder", str(models), "--latent-shape", "4", "2", "4", "4", "--samples-per-prompt", "2",
            "--samples-per-shard", "3", "--steps", "3", "--text-len", "10", "--latent-dtype", "float32",
            "--negative-prompt", "bad quality", "--device", "cpu", "--seed", "7", "--log-interval", "0"]
    assert tool.main([*args, "--batch-size", "2"]) == 0
    log = capfd.readouterr()
    assert "empty prompt" in log.err and "4 ok, 2 bad (empty_prompt 2)" in log.out and "\r" not in log.out
    ds = ShardDataset(str(out))
    assert ds.counts == [2, 2] and ds.latent_shape == (4, 2, 4, 4)
    # sample 4 (prompt row 2, second draw) = the Euler sampler run directly with the same keys
    text = UMT5TextEncoder(str(models), max_length=10)
    emb = text.encode(["a dog jumps in the park"])[0]
    ctx = torch.zeros(1, 10, TEXT_DIM)
    ctx[0, : emb.shape[0]] = emb
    neg = torch.zeros(1, 10, TEXT_DIM)
    neg[0, :3] = text.encode(["bad quality"])[0]
    want = euler_sample(teacher.eval(), ctx, neg, (4, 2, 4, 4), [5], seed=7, num_steps=3, guidance_scale=5.0, shift=5.0)
    keys = [k for k, _ in __import__("rcm_megatron.data.shards", fromlist=["x"]).read_shard_index(str(out / shard_name(1)))]
    assert keys == ["s000000004", "s000000005"]
    torch.testing.assert_close(ds[3]["latents"], want[0].float(), rtol=1e-4, atol=1e-4)
    # batch size does not change the samples; a rerun skips complete shards
    blob = (out / shard_name(1)).read_bytes()
    os.remove(out / shard_name(1))
    assert tool.main([*args, "--batch-size", "1"]) == 0
    assert "(1 already complete)" in capfd.readouterr().out
    other = ShardDataset(str(out))
    torch.testing.assert_close(other[3]["latents"], ds[3]["latents"], rtol=1e-5, atol=1e-5)
    assert len(blob) == len((out / shard_name(1)).read_bytes())
    # configuration errors exit 2 before sampling
    assert tool.main([*args[:-8], "--latent-shape", "3", "2", "4", "4"]) == 2
    assert "--latent-shape C=3, the teacher expects in_channels=4" in capfd.readouterr().err
