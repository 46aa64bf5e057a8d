"""tools/prepare_data.py --task i2v end to end (real processes) on tiny inputs made here: videos
written with PyAV, a tiny random AutoencoderKLWan, UMT5 encoder and CLIPVisionModel (with its
CLIPImageProcessor) saved to local folders. The shards hold the first frame's latents, Wan's mask +
condition latents and the CLIP embeddings, equal to what the encoders give; pretrain_rcm.py trains
a tiny I2V teacher on them; bad input exits 2 with one line before any model loads."""

import json
import os
import subprocess
import sys

import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("webdataset")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from rcm_megatron.checkpointing.model_file import save_model_file  # noqa: E402
from rcm_megatron.data.shards import ShardDataset  # noqa: E402
from rcm_megatron.data.video import read_video, resize_center_crop  # noqa: E402
from rcm_megatron.models import WanDiT  # noqa: E402
from rcm_megatron.models.config import WanConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "<pad> </s> <unk> a red green ball cat dog runs jumps in the park bad quality".split()
TEXT_DIM, CLIP_DIM = 16, 8


def write_video(path, num_frames, seed):
    g = torch.Generator().manual_seed(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        for i in range(num_frames):
            img = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img.numpy(), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A Wan-I2V-pipeline-shaped folder (vae/, text_encoder/, tokenizer/, image_encoder/,
    image_processor/; tiny, random) and a manifest of three videos."""
    from tiny_wan_assets import write_tiny_wan_folder

    root = write_tiny_wan_folder(tmp_path_factory.mktemp("wan_i2v"), WORDS, TEXT_DIM, CLIP_DIM)
    videos = tmp_path_factory.mktemp("videos")
    with open(videos / "manifest.jsonl", "w") as f:
        for i in range(3):
            write_video(videos / f"v{i}.mp4", 9, seed=i)
            f.write(json.dumps({"video": f"v{i}.mp4", "caption": f"a red ball runs {i}"}) + "\n")
    return root, videos / "manifest.jsonl"


def run(script, *args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def prepare_args(root, manifest, out, *extra):
    return ["--input", str(manifest), "--output", str(out), "--vae", str(root), "--text-encoder", str(root),
            "--num-frames", "5", "--height", "16", "--width", "16", "--fps", "0", "--samples-per-shard", "2",
            "--text-len", "8", "--latent-dtype", "float32", "--negative-prompt", "bad quality", "--device", "cpu",
            "--log-interval", "0", *extra]


@pytest.mark.slow
def test_prepare_i2v_shards_hold_the_image_conditions_and_train(inputs, tmp_path):
    root, manifest = inputs
    out = tmp_path / "shards"
    run("tools/prepare_data.py", *prepare_args(root, manifest, out, "--task", "i2v", "--image-encoder", str(root)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["task"] == "i2v" and meta["latent_shape"] == [4, 2, 2, 2]
    assert meta["conditions"] == {"first_frame": [4, 1, 2, 2], "condition": [8, 2, 2, 2], "image_embeds": [5, CLIP_DIM]}
    ds = ShardDataset(str(out))
    assert ds.conditions == ("first_frame", "condition", "image_embeds") and len(ds) == 3
    assert ds.condition_channels == 8 and ds.image_dim == CLIP_DIM
    from rcm_megatron.data.encoders import CLIPImageEncoder, WanVAEEncoder, image_conditions

    vae, clip_enc = WanVAEEncoder(str(root)), CLIPImageEncoder(str(root))
    clip = resize_center_crop(read_video(str(manifest.parent / "v1.mp4"), 5), 16, 16)
    want = image_conditions(vae, clip)
    s = ds[1]
    torch.testing.assert_close(s["first_frame"], want["first_frame"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["condition"], want["condition"], rtol=1e-5, atol=1e-5)
    assert (s["condition"][:4, 0] == 1).all() and (s["condition"][:4, 1:] == 0).all()  # Wan's mask, 4 channels
    torch.testing.assert_close(s["image_embeds"], clip_enc.encode(clip[:, 0][None])[0], rtol=1e-5, atol=1e-5)
    # a tiny Wan2.1-I2V-shaped teacher (4 noisy + 8 condition channels, CLIP tokens) trains on the shards
    cfg = WanConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, in_channels=12,
                    out_channels=4, text_dim=TEXT_DIM, freq_dim=32, image_dim=CLIP_DIM)
    m = WanDiT(cfg)
    m.reset_parameters(0)
    save_model_file(str(tmp_path / "teacher.pt"), cfg.to_dict(), m.state_dict())
    log = tmp_path / "log"
    run("pretrain_rcm.py", "--teacher-checkpoint", str(tmp_path / "teacher.pt"), "--data", str(out), "--device", "cpu",
        "--no-memory-check", "--train-iters", "3", "--micro-batch-size", "1", "--log-interval", "1",
        "--log-dir", str(log))
    recs = [json.loads(line) for line in open(log / "metrics.jsonl")]
    assert len(recs) == 3 and all(abs(r["loss"]) < float("inf") for r in recs)
    # an image model of another CLIP width is refused, before any model is built
    save_model_file(str(tmp_path / "wide.pt"), cfg.replace(image_dim=CLIP_DIM * 2).to_dict(),
                    WanDiT(cfg.replace(image_dim=CLIP_DIM * 2)).state_dict())
    p = run("pretrain_rcm.py", "--teacher-checkpoint", str(tmp_path / "wide.pt"), "--data", str(out), "--device",
            "cpu", "--no-memory-check", "--train-iters", "1", "--log-dir", str(tmp_path / "log2"), check=False)
    assert p.returncode == 2 and f"image embeddings are {CLIP_DIM} wide, the model expects image_dim=16" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (["--task", "i2v"], "--task i2v needs --image-encoder"),
    (["--image-encoder", "/x"], "--image-encoder is used only with --task i2v"),
    (["--task", "i2v", "--image-encoder", "/no/such/clip"], "--image-encoder /no/such/clip: no such directory"),
])
def test_prepare_i2v_bad_input_exits_2(inputs, tmp_path, extra, message):
    root, manifest = inputs
    p = run("tools/prepare_data.py", *prepare_args(root, manifest, tmp_path / "o", *extra), check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_synthesize_refuses_an_image_teacher(inputs, tmp_path):
    """Without --task i2v, synthesize_data.py refuses an I2V teacher: it is named, exit 2, nothing written
    (tests/test_synthesize_i2v.py samples one with --task i2v)."""
    root, _ = inputs
    cfg = WanConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, in_channels=12,
                    out_channels=4, text_dim=TEXT_DIM, freq_dim=32, image_dim=CLIP_DIM)
    save_model_file(str(tmp_path / "t.pt"), cfg.to_dict(), WanDiT(cfg).state_dict())
    (tmp_path / "p.txt").write_text("a red ball\n")
    p = run("tools/synthesize_data.py", "--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o"),
            "--teacher-checkpoint", str(tmp_path / "t.pt"), "--text-encoder", str(root), "--latent-shape", "4", "2",
            "2", "2", "--device", "cpu", check=False)
    assert p.returncode == 2 and "sample it with --task i2v from prompt + image pairs" in p.stderr, p.stderr
    assert "in_channels 12 = 4 noisy + 8 condition" in p.stderr and not os.path.exists(tmp_path / "o")
