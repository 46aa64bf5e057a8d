"""tools/convert_checkpoint.py with Wan2.2 A14B (two experts) and Wan2.1 I2V (real processes): a
diffusers pipeline folder (transformer/ + transformer_2/) or an original release folder
(high_noise_model/ + low_noise_model/) imports both experts with the boundary; export writes both
back so diffusers loads them; the experts' weights survive the round trip exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from rcm_megatron.checkpointing.loading import open_model  # noqa: E402
from rcm_megatron.convert.diffusers_wan import load_diffusers_wan_experts, save_diffusers_wan_experts  # noqa: E402
from rcm_megatron.convert.wan_original import ours_to_original  # noqa: E402
from rcm_megatron.models import WanExperts  # noqa: E402
from rcm_megatron.models.config import WanConfig  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = WanConfig(num_layers=1, hidden_size=64, ffn_hidden_size=96, num_attention_heads=2, in_channels=36,
                out_channels=16, text_dim=32, freq_dim=32)  # a tiny Wan2.2 I2V expert (no CLIP branch)


def run(*args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diffusers_two_expert_folder_round_trip(tmp_path):
    experts = WanExperts.build(CFG, 0.9, seed=3)
    save_diffusers_wan_experts(experts, tmp_path / "wan22")
    run("import", "--hf-dir", str(tmp_path / "wan22"), "--save", str(tmp_path / "ckpt"))
    info = json.loads((tmp_path / "ckpt" / "experts.json").read_text())
    assert info["boundary_ratio"] == 0.9
    for key in ("high_noise", "low_noise"):
        m, _ = open_model(str(tmp_path / "ckpt" / key))
        assert same(m, getattr(experts, key)), key  # transformer_2 is read too, as the low-noise expert
    run("export", "--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    back = load_diffusers_wan_experts(tmp_path / "out")
    assert back.boundary_ratio == 0.9 and same(back.high_noise, experts.high_noise) and same(back.low_noise,
                                                                                               experts.low_noise)
    from diffusers import WanTransformer3DModel

    WanTransformer3DModel.from_pretrained(tmp_path / "out" / "transformer_2")  # diffusers reads it


def test_original_two_expert_release_folder(tmp_path):
    experts = WanExperts.build(CFG, 0.9, seed=5)
    orig = {"_class_name": "WanModel", "model_type": "i2v", "dim": 64, "ffn_dim": 96, "num_heads": 2, "num_layers": 1,
            "in_dim": 36, "out_dim": 16, "text_dim": 32, "freq_dim": 32, "eps": 1e-6}
    for key, folder in (("high_noise", "high_noise_model"), ("low_noise", "low_noise_model")):
        d = tmp_path / "Wan2.2" / folder
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(orig))
        save_file({k: v.contiguous() for k, v in ours_to_original(getattr(experts, key).state_dict()).items()},
                  str(d / "diffusion_pytorch_model.safetensors"))
    p = run("import", "--wan-pth", str(tmp_path / "Wan2.2"), "--save", str(tmp_path / "ckpt"))
    assert "boundary_ratio 0.9" in p.stdout  # the I2V A14B default (in_channels 36)
    for key in ("high_noise", "low_noise"):
        m, _ = open_model(str(tmp_path / "ckpt" / key))
        assert same(m, getattr(experts, key)), key


def test_two_expert_bad_input_exits_2(tmp_path):
    experts = WanExperts.build(CFG, 0.9, seed=3)
    save_diffusers_wan_experts(experts, tmp_path / "wan22")
    p = run("import", "--hf-dir", str(tmp_path / "wan22"), "--save", str(tmp_path / "c"), "--boundary-ratio", "1.5",
            check=False)
    assert p.returncode == 2 and "--boundary-ratio must be in (0, 1), got 1.5" in p.stderr
    tiny = WanExperts.build(CFG.replace(in_channels=16, out_channels=16), 0.875).high_noise
    from rcm_megatron.convert.diffusers_wan import save_diffusers_wan

    save_diffusers_wan(tiny, tmp_path / "wan22" / "transformer_2", overwrite=True)  # experts that do not match
    p = run("import", "--hf-dir", str(tmp_path / "wan22"), "--save", str(tmp_path / "c2"), check=False)
    assert p.returncode == 2 and "the two experts differ in architecture" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "c2" / "high_noise")
