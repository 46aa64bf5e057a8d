"""First contact with the tools on the toy model: generate.py takes its settings from the checkpoint's
training run and refuses what would not fit, the tools print no TE/Apex noise, exports follow the umask."""

import os
import resource
import stat
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def tool(*argv, limit_bytes=None, timeout=300):
    def limit():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=ROOT, preexec_fn=limit)


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """The default run (toy teacher, toy data), 2 iterations."""
    root = tmp_path_factory.mktemp("toy")
    p = tool("pretrain_rcm.py", "--train-iters", "2", "--save", str(root / "ckpt"), "--log-dir", str(root / "logs"),
             timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return root / "ckpt"


@pytest.mark.slow
def test_generate_from_toy_checkpoint_uses_its_training_settings(toy_checkpoint, tmp_path):
    t0 = time.time()
    p = tool("tools/generate.py", "--load", str(toy_checkpoint), "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.time() - t0 < 120
    out = torch.load(tmp_path / "out" / "latents.pt", weights_only=True)
    assert out["student"].shape == (4, 4, 4, 8, 8)  # the 4 toy classes at the toy task's latent shape
    assert out["prompts"] == [f"toy class {c}" for c in range(4)] and torch.isfinite(out["student"]).all()
    assert "guidance_scale 2.0" in p.stdout and (tmp_path / "out" / "contact_sheet.png").is_file()
    assert "Transformer Engine" not in p.stderr and "load_state_dict` is deprecated" not in p.stderr
    # with the toy teacher side by side: the recorded guidance, the class embeddings' negative
    p = tool("tools/generate.py", "--load", str(toy_checkpoint), "--out", str(tmp_path / "t"), "--teacher-steps", "2",
             "--teacher", os.path.join(ROOT, "assets", "toy_teacher.pt"), "--sampler", "euler")
    assert p.returncode == 0, p.stderr[-2000:]
    out = torch.load(tmp_path / "t" / "latents.pt", weights_only=True)
    assert out["teacher"].shape == (4, 4, 4, 8, 8) and out["teacher_sampler"]["guidance_scale"] == 2.0


@pytest.mark.slow
def test_generate_refuses_what_would_not_fit_before_allocating(toy_checkpoint, tmp_path):
    # under an address-space limit, so that without the check the process fails instead of the machine
    p = tool("tools/generate.py", "--load", str(toy_checkpoint), "--out", str(tmp_path / "o"),
             "--latent-shape", "4", "41", "240", "416", limit_bytes=12 << 30)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and "latents [4, 41, 240, 416] x batch 1 need about" in lines[0], lines
    assert "GiB is available" in lines[0] and not (tmp_path / "o").exists()


def test_recorded_settings_and_estimate():
    from rcm_megatron.eval.generation_settings import recorded_settings, sampling_bytes
    from rcm_megatron.models import WanConfig

    toy = WanConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, in_channels=4,
                    out_channels=4, text_dim=32)
    meta = {"rcm_config": {"cfg_scale": 2.0, "sample_mid_times": [1.3, 1.0], "sample_sigma_max": 160.0}}
    rec = recorded_settings(meta, toy)
    assert rec == {"toy": True, "latent_shape": (4, 4, 8, 8), "text_len": 4, "guidance_scale": 2.0,
                   "mid_times": (1.3, 1.0), "sigma_max": 160.0}
    wan = WanConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, in_channels=16,
                    out_channels=16, text_dim=64)
    assert recorded_settings({}, wan) == {"toy": False}
    rec = recorded_settings({"data": {"source": "shards", "latent_shape": [16, 3, 8, 8], "text_len": 8}}, wan)
    assert rec["latent_shape"] == (16, 3, 8, 8) and rec["text_len"] == 8 and not rec["toy"]
    # quadratic in tokens on CPU (attention scores), linear on GPU; weights counted once
    small, big = (sampling_bytes(wan, (16, 1, 2 * n, 16), 1, 100, "cpu") - 100 for n in (128, 256))
    assert big > 3.5 * small
    assert sampling_bytes(wan, (16, 1, 32, 16), 2, 100, "cuda") - 100 == 2 * (sampling_bytes(wan, (16, 1, 32, 16), 1, 100, "cuda") - 100)


def test_exported_safetensors_follow_the_umask(tmp_path):
    from rcm_megatron.checkpointing.diffusers_export import export_diffusers
    from rcm_megatron.checkpointing.sources import StateDictSource
    from rcm_megatron.models import WanConfig, WanDiT

    cfg = WanConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, in_channels=4,
                    out_channels=4, text_dim=32)
    src = StateDictSource(cfg, WanDiT(cfg).state_dict(), {"source": "test"})
    old = os.umask(0o002)
    try:
        summary = export_diffusers(src, str(tmp_path / "out"))
    finally:
        os.umask(old)
    for name in summary["files"] + ["config.json"]:
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o664, name


@pytest.mark.slow
def test_tools_print_no_te_apex_warnings(toy_checkpoint, tmp_path):
    p = tool("tools/convert_checkpoint.py", "info", str(toy_checkpoint))
    assert p.returncode == 0, p.stderr[-2000:]
    p = tool("tools/export_teacher.py", str(toy_checkpoint), str(tmp_path / "m.pt"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Transformer Engine" not in p.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "m.pt").st_mode) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
