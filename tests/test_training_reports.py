"""What training reports besides metrics.jsonl: decoded video samples in TensorBoard
(--log-video-interval with a tiny random AutoencoderKLWan) and Weights & Biases scalars (a
recording ``wandb`` module put on the path, standing in for the real client's network side);
their flag errors exit 2 before any model is built."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
from rcm_megatron.data.shards import ShardWriter, shard_name, write_dataset_meta, write_negative_context  # noqa: E402
from rcm_megatron.training.video_samples import decode_bytes, frame_grid  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 2, 4, 4)  # tiny VAE (z_dim 16, factors 4 / 8): 5 frames of 32 x 32
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])

# A stand-in for the wandb client: records init / log / finish calls as JSON lines in $FAKE_WANDB_LOG.
FAKE_WANDB = '''
import json, os
def _rec(kind, **kw):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"call": kind, **kw}, default=str) + "\\n")
class _Run:
    def log(self, data, step=None):
        _rec("log", data=data, step=step)
    def finish(self):
        _rec("finish")
def init(project=None, name=None, dir=None, config=None, **kw):
    _rec("init", project=project, name=name, dir=dir, has_config=bool(config))
    return _Run()
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    root = tmp_path_factory.mktemp("reports")
    torch.manual_seed(0)
    AutoencoderKLWan(**TINY_VAE).save_pretrained(root / "vae")
    g = torch.Generator().manual_seed(0)
    data = root / "shards"
    write_dataset_meta(str(data), {"latent_shape": SHAPE, "text_len": 6, "text_dim": 64, "latent_dtype": "float32"})
    write_negative_context(str(data), torch.randn(6, 64, generator=g), "blurry")
    with ShardWriter(os.path.join(data, shard_name(0)), latent_dtype=torch.float32) as w:
        for i in range(4):
            w.write(f"s{i:06d}", torch.randn(SHAPE, generator=g), torch.randn(4, 64, generator=g), f"prompt {i}")
    torch.save({"context": [torch.randn(3, 64, generator=g), torch.randn(5, 64, generator=g)]}, root / "prompts.pt")
    (root / "fakewandb").mkdir()
    (root / "fakewandb" / "wandb.py").write_text(FAKE_WANDB)
    return root


def pretrain(*args, env=None, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_rcm.py"), "--model", "tiny", "--device", "cpu",
           "--log-interval", "1", "--micro-batch-size", "1", "--global-batch-size", "1", "--rollout-max-steps", "4",
           "--student-update-freq", "2", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-5000:]
    return p


@pytest.mark.slow
def test_video_samples_in_tensorboard(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain("--data", str(assets / "shards"), "--train-iters", "4", "--log-dir", str(tmp_path),
             "--log-video-interval", "2", "--vae", str(assets / "vae"), "--log-video-context", str(assets / "prompts.pt"),
             "--log-video-teacher-steps", "2")
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    steps = {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]}
    for k in (1, 2, 4):
        for p in (0, 1):  # both prompts of the context file
            assert steps[f"videos/student_{k}step/prompt{p}"] == [2, 4]
        assert steps[f"frames/student_{k}step"] == [2, 4]
    assert steps["videos/teacher_2step/prompt0"] == [2] and steps["frames/teacher_2step"] == [2]  # once
    gif = acc.Images("videos/student_4step/prompt0")[0]
    assert gif.encoded_image_string[:6] == b"GIF89a" and (gif.width, gif.height) == (32, 32)
    grid = acc.Images("frames/student_4step")[0]
    assert (grid.height, grid.width) == (2 * 34 + 2, 5 * 34 + 2)  # 2 prompts x 5 frames, 2-pixel gaps


@pytest.mark.slow
def test_wandb_gets_the_tensorboard_scalars(assets, tmp_path):
    log = tmp_path / "wandb_calls.jsonl"
    env = {"PYTHONPATH": os.pathsep.join([str(assets / "fakewandb"), ROOT, os.environ.get("PYTHONPATH", "")]),
           "FAKE_WANDB_LOG": str(log)}
    pretrain("--data", str(assets / "shards"), "--train-iters", "3", "--log-dir", str(tmp_path / "run"),
             "--wandb-project", "rcm-test", "--wandb-exp-name", "tiny", env=env)
    calls = [json.loads(line) for line in open(log)]
    assert calls[0] == {"call": "init", "project": "rcm-test", "name": "tiny", "dir": str(tmp_path / "run" / "wandb"),
                        "has_config": True}
    assert calls[-1] == {"call": "finish"}
    logged = {c["step"]: c["data"] for c in calls if c["call"] == "log"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    tb = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            tb.setdefault(e.step, {})[tag] = e.value
    assert sorted(logged) == sorted(tb) == [1, 2, 3]
    for step in tb:
        assert set(logged[step]) == set(tb[step])
        for tag, v in tb[step].items():
            assert logged[step][tag] == pytest.approx(v, rel=1e-6, abs=1e-30)  # TensorBoard stores float32


@pytest.mark.slow
def test_flag_errors_exit_2_before_building(assets, tmp_path):
    env = {"PYTHONPATH": ROOT}  # no wandb on the path (the test environment does not install it)
    cases = [
        (["--wandb-project", "p"], "the wandb package is not installed"),
        (["--wandb-exp-name", "x"], "--wandb-exp-name / --wandb-save-dir need --wandb-project"),
        (["--log-video-interval", "2"], "--log-video-interval needs --vae PATH"),
        (["--log-video-interval", "2", "--vae", str(tmp_path / "nope")], "no such directory"),
        (["--log-video-interval", "2", "--vae", str(assets / "shards")], "cannot read"),
        (["--vae", str(assets / "vae")], "--log-video-interval N, which is not set"),
        (["--log-video-interval", "2", "--vae", str(assets / "vae"), "--log-video-context", str(tmp_path / "x.pt")],
         "--log-video-context"),
    ]
    try:
        import wandb  # noqa: F401
        cases = cases[1:]
    except ImportError:
        pass
    for flags, msg in cases:
        p = pretrain("--data", str(assets / "shards"), "--train-iters", "1", "--log-dir", str(tmp_path / "r"), *flags,
                     env=env, check=False)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, (flags, p.stderr[-2000:])
        assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_frame_grid_and_decode_estimate():
    rows = [torch.full((5, 4, 6, 3), i, dtype=torch.uint8) for i in (10, 20)]
    g = frame_grid(rows, max_frames=3)
    assert g.shape == (2 * 6 + 2, 3 * 8 + 2, 3) and g[2, 2, 0] == 10 and g[8, 2, 0] == 20 and g[0, 0, 0] == 255
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**TINY_VAE)
    small, big = decode_bytes(vae, (4, 4)), decode_bytes(vae, (60, 104))
    assert big == small * 390 and small == 8 * 8 * 4 * 32 * 32 * 4
