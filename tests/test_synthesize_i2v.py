"""tools/synthesize_data.py --task i2v end to end (real processes) on tiny inputs made here: prompt +
image pairs, a tiny random Wan pipeline folder (tests/tiny_wan_assets.py) and a tiny Wan2.1-I2V-shaped
teacher. The shards hold the image's conditions exactly as tools/prepare_data.py --task i2v stores a
video's first frame, the teacher's samples conditioned on them, and train in pretrain_rcm.py; two
torchrun ranks write the single process's shards; bad input exits 2 with one line before any model."""

import importlib.util
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
from rcm_megatron.data.conditions import batch_conditioning  # noqa: E402
from rcm_megatron.data.shards import ShardDataset, shard_name  # noqa: E402
from rcm_megatron.data.video import read_video  # noqa: E402
from rcm_megatron.models import WanDiT  # noqa: E402
from rcm_megatron.models.config import WanConfig  # noqa: E402
from rcm_megatron.rcm.teacher_sampling import euler_sample  # noqa: E402

pytestmark = pytest.mark.slow  # runs the tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "<pad> </s> <unk> a red green ball cat dog runs jumps in the park bad quality".split()
TEXT_DIM, CLIP_DIM = 16, 8
CFG = WanConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, in_channels=12,
                out_channels=4, text_dim=TEXT_DIM, freq_dim=32, image_dim=CLIP_DIM)  # Wan2.1 I2V form, tiny


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_video(path, num_frames, seed):
    g = torch.Generator().manual_seed(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        for _ in range(num_frames):
            img = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img.numpy(), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def save_png(path, frame):
    from PIL import Image

    Image.fromarray(frame.numpy()).save(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny pipeline folder, a teacher file, one video and a manifest of prompt + image pairs whose
    row 0 image is that video's decoded first frame (PNG: lossless), row 1 another image, row 2 an
    empty prompt (skipped and counted)."""
    from tiny_wan_assets import write_tiny_wan_folder

    root = write_tiny_wan_folder(tmp_path_factory.mktemp("wan_i2v"), WORDS, TEXT_DIM, CLIP_DIM)
    d = tmp_path_factory.mktemp("pairs")
    write_video(d / "v0.mp4", 9, seed=0)
    save_png(d / "img0.png", read_video(str(d / "v0.mp4"), 5)[0])
    save_png(d / "img1.png", (torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8))
    with open(d / "pairs.jsonl", "w") as f:
        for prompt, image in (("a red ball runs", "img0.png"), ("a cat jumps in the park", "img1.png"),
                              ("", "img1.png")):
            f.write(json.dumps({"prompt": prompt, "image": image}) + "\n")
    (d / "video.jsonl").write_text(json.dumps({"video": "v0.mp4", "caption": "a red ball runs"}) + "\n")
    m = WanDiT(CFG)
    m.reset_parameters(0)
    save_model_file(str(d / "teacher.pt"), CFG.to_dict(), m.state_dict())
    return root, d


def synth_args(root, d, out, *extra, manifest="pairs.jsonl", teacher="teacher.pt"):
    return ["--prompts", str(d / manifest), "--output", str(out), "--teacher-checkpoint", str(d / teacher),
            "--text-encoder", str(root), "--task", "i2v", "--vae", str(root), "--image-encoder", str(root),
            "--latent-shape", "4", "2", "2", "2", "--samples-per-prompt", "2", "--samples-per-shard", "3",
            "--steps", "2", "--text-len", "8", "--latent-dtype", "float32", "--negative-prompt", "bad quality",
            "--device", "cpu", "--seed", "5", "--log-interval", "0", *extra]


def run(*cmd, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def synthesized(inputs, tmp_path_factory):
    """One in-process run, three samples per teacher call: (output folder, its log)."""
    import contextlib
    import io

    root, d = inputs
    out = tmp_path_factory.mktemp("synth") / "out"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert load_tool("synthesize_data").main(synth_args(root, d, out, "--batch-size", "3")) == 0
    return out, log.getvalue()


def test_synthesized_i2v_shards_match_prepare_and_train(inputs, synthesized, tmp_path):
    root, d = inputs
    out, log = synthesized
    assert "4 ok, 2 bad (empty_prompt 2)" in log
    meta = json.loads((out / "meta.json").read_text())
    assert meta["task"] == "i2v" and meta["num_frames"] == 5 and (meta["height"], meta["width"]) == (16, 16)
    ds = ShardDataset(str(out))
    assert ds.conditions == ("first_frame", "condition", "image_embeds") and len(ds) == 4
    assert ds.condition_channels == 8 and ds.image_dim == CLIP_DIM
    # the condition of row 0 (samples 0, 1) = what prepare_data --task i2v stores for the video whose
    # first frame is that image
    ref = tmp_path / "prepared"
    assert load_tool("prepare_data").main([
        "--input", str(d / "video.jsonl"), "--output", str(ref), "--vae", str(root), "--text-encoder", str(root),
        "--task", "i2v", "--image-encoder", str(root), "--num-frames", "5", "--height", "16", "--width", "16",
        "--fps", "0", "--text-len", "8", "--latent-dtype", "float32", "--device", "cpu", "--log-interval", "0"]) == 0
    prepared = ShardDataset(str(ref))
    assert json.loads((ref / "meta.json").read_text())["conditions"] == meta["conditions"]
    for i in (0, 1):
        for field in ("first_frame", "condition", "image_embeds"):
            torch.testing.assert_close(ds[i][field], prepared[0][field], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ds[2]["condition"], ds[0]["condition"])  # row 1: another image
    # sample 3 (row 1, second draw) = the teacher's Euler sampler run directly on the stored conditions
    teacher = WanDiT(CFG)
    teacher.reset_parameters(0)
    s3 = ds[3]
    raw = {k: s3[k][None] for k in ("first_frame", "condition", "image_embeds")}
    neg = torch.zeros(1, 8, TEXT_DIM)
    neg[0, :3] = torch.load(out / "negative_context.pth")["context"]
    want = euler_sample(teacher.eval(), s3["context"][None].float(), neg, (4, 2, 2, 2), [3], seed=5, num_steps=2,
                        guidance_scale=5.0, shift=5.0, cond=batch_conditioning(raw, CFG))
    torch.testing.assert_close(s3["latents"], want[0].float(), rtol=1e-4, atol=1e-4)
    # the trainer's I2V data path reads the shards and distills the teacher on them
    log = tmp_path / "log"
    run("pretrain_rcm.py", "--teacher-checkpoint", str(d / "teacher.pt"), "--data", str(out), "--device", "cpu",
        "--no-memory-check", "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--log-interval", "1", "--log-dir", str(log))
    recs = [json.loads(line) for line in open(log / "metrics.jsonl")]
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


def test_synthesize_i2v_two_ranks_with_torchrun(inputs, synthesized, tmp_path):
    """Each rank writes its own shards (one sample per teacher call); together they hold the
    single-process output (three per call): samples are keyed by index, not by rank or batch."""
    from distributed_utils import free_port
    from rcm_megatron.data.shards import read_shard_index

    root, d = inputs
    single, _ = synthesized
    dist = tmp_path / "dist"
    p = run("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            os.path.join(ROOT, "tools", "synthesize_data.py"), *synth_args(root, d, dist))
    assert "[synthesize 0/2]" in p.stdout and "[synthesize 1/2]" in p.stdout and "holds 4 samples" in p.stdout
    for s in range(2):
        keys = [[k for k, _ in read_shard_index(str(o / shard_name(s)))] for o in (dist, single)]
        assert keys[0] == keys[1] == [["s000000000", "s000000001", "s000000002"], ["s000000003"]][s]
    a, b = ShardDataset(str(dist)), ShardDataset(str(single))
    for i in range(len(b)):
        assert a[i]["prompt"] == b[i]["prompt"]
        for field in ("latents", "context", "first_frame", "condition", "image_embeds"):
            torch.testing.assert_close(a[i][field], b[i][field], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("missing_image", r"--prompts row 1: image .*nothere\.png: no such file$"),
    ("unreadable_image", r"--prompts row 0: image .*broken\.png: not a readable image"),
    ("no_image_column", r"no image column \(tried image, image_path, .*set --image-column\)"),
    ("txt_prompts", r"prompt \+ image pairs need a \.csv/\.tsv/\.jsonl/\.json manifest"),
    ("t2v_task_for_i2v_teacher", r"in_channels 12 = 4 noisy \+ 8 condition.*sample it with --task i2v"),
    ("no_vae", r"--task i2v needs --vae"),
    ("no_image_encoder", r"image_dim 8 \(image embeddings\)\); --task i2v needs --image-encoder"),
])
def test_synthesize_i2v_bad_input_exits_2(inputs, tmp_path, case, message):
    """One line naming the row, file or flag, exit 2, nothing written. The image cases pass a teacher
    file that is not a checkpoint at all: they are found before the teacher is even read."""
    import re

    root, d = inputs
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "not_a_teacher.pt").write_text("garbage")
    rows = {"missing_image": [{"prompt": "a cat", "image": str(d / "img0.png")},
                              {"prompt": "a dog", "image": "nothere.png"}],
            "unreadable_image": [{"prompt": "a cat", "image": "broken.png"}],
            "no_image_column": [{"prompt": "a cat", "picture": str(d / "img0.png")}]}
    args = synth_args(root, d, tmp_path / "o")
    if case in rows:
        with open(tmp_path / "m.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[case])
        args = synth_args(root, tmp_path, tmp_path / "o", manifest="m.jsonl", teacher="not_a_teacher.pt")
    elif case == "txt_prompts":
        (tmp_path / "p.txt").write_text("a red ball\n")
        args = synth_args(root, tmp_path, tmp_path / "o", manifest="p.txt", teacher="not_a_teacher.pt")
    elif case == "t2v_task_for_i2v_teacher":
        (tmp_path / "p.txt").write_text("a red ball\n")
        args = ["--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o"), "--teacher-checkpoint",
                str(d / "teacher.pt"), "--text-encoder", str(root), "--latent-shape", "4", "2", "2", "2",
                "--device", "cpu"]
    else:
        drop = "--vae" if case == "no_vae" else "--image-encoder"
        k = args.index(drop)
        args = args[:k] + args[k + 2:]
    p = run(os.path.join(ROOT, "tools", "synthesize_data.py"), *args, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), p.stderr
    assert not (tmp_path / "o").exists()


def test_synthesize_i2v_from_a_two_expert_teacher(inputs, tmp_path, capfd):
    """A two-expert folder (Wan2.2 A14B form) as the teacher: each Euler step runs the expert of its time."""
    from test_pretrain_experts import expert_dir

    from rcm_megatron.models import WanExperts

    root, d = inputs
    experts = expert_dir(tmp_path / "wan22", cfgs=(CFG, CFG))  # high: seed 0, low: seed 1
    out = tmp_path / "synth"
    args = synth_args(root, d, out, "--limit", "1", "--samples-per-prompt", "1", "--steps", "4")
    args[args.index("--teacher-checkpoint") + 1] = experts
    assert load_tool("synthesize_data").main(args) == 0
    ds = ShardDataset(str(out))
    assert len(ds) == 1
    nets = []
    for seed in (0, 1):
        m = WanDiT(CFG)
        m.reset_parameters(seed)
        nets.append(m.eval())
    teacher = WanExperts(*nets, 0.9).eval()
    s0 = ds[0]
    raw = {k: s0[k][None] for k in ("first_frame", "condition", "image_embeds")}
    neg = torch.zeros(1, 8, TEXT_DIM)
    neg[0, :3] = torch.load(out / "negative_context.pth")["context"]
    want = euler_sample(teacher, s0["context"][None].float(), neg, (4, 2, 2, 2), [0], seed=5, num_steps=4,
                        guidance_scale=5.0, shift=5.0, cond=batch_conditioning(raw, CFG))
    torch.testing.assert_close(s0["latents"], want[0].float(), rtol=1e-4, atol=1e-4)
    alone = euler_sample(nets[1], s0["context"][None].float(), neg, (4, 2, 2, 2), [0], seed=5, num_steps=4,
                         guidance_scale=5.0, shift=5.0, cond=batch_conditioning(raw, CFG))
    assert not torch.allclose(want, alone, atol=1e-3)  # the high-noise expert took part
