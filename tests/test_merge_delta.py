"""tools/merge_delta.py: base + scale * (student - teacher) written as a diffusers folder, for a
single model and for both experts of a Wan2.2 pipeline folder; dry run; bad input named in one
line with exit 2 before anything is written."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from diffusers import WanTransformer3DModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_attention_heads=4, attention_head_dim=32, text_dim=64, ffn_dim=256, num_layers=2, rope_max_seq_len=64)


def _tool():
    spec = importlib.util.spec_from_file_location("tool_merge_delta", os.path.join(ROOT, "tools", "merge_delta.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(seed, **kw):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**{**SMALL, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    teacher = _model(0)
    student = _model(0)
    with torch.no_grad():  # distillation moved every tensor but one
        for name, p in student.named_parameters():
            if name != "blocks.1.ffn.net.2.bias":
                p.add_(0.01 * torch.randn_like(p))
    paths = {"teacher": teacher, "student": student, "base": _model(1), "base2": _model(2),
             "wide": _model(3, ffn_dim=128), "i2v": _model(4, in_channels=36, out_channels=16, image_dim=48,
                                                           added_kv_proj_dim=128)}
    for name, m in paths.items():
        m.save_pretrained(root / name)
    pipe = root / "pipe"
    paths["base"].save_pretrained(pipe / "transformer")
    paths["base2"].save_pretrained(pipe / "transformer_2")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    return root, {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in paths.items()}


def _expected(sd, name, scale):
    return (sd["base"][name] + scale * (sd["student"][name] - sd["teacher"][name]))


def test_merge_writes_base_plus_scaled_delta(models, tmp_path):
    root, sd = models
    args = ["--student", str(root / "student"), "--teacher", str(root / "teacher"), "--base", str(root / "base"),
            "--out", str(tmp_path / "out"), "--scale", "0.5"]
    assert _tool().main(args) == 0
    got = WanTransformer3DModel.from_pretrained(tmp_path / "out").state_dict()
    assert set(got) == set(sd["base"])
    for n, t in got.items():
        assert torch.equal(t, _expected(sd, n, 0.5)), n
    assert torch.equal(got["blocks.1.ffn.net.2.bias"], sd["base"]["blocks.1.ffn.net.2.bias"])


def test_merge_into_both_experts(models, tmp_path):
    root, sd = models
    out = tmp_path / "out"
    assert _tool().main(["--student", str(root / "student"), "--teacher", str(root / "teacher"),
                         "--base", str(root / "pipe"), "--out", str(out)]) == 0
    assert json.loads((out / "model_index.json").read_text())["boundary_ratio"] == 0.875
    for sub, base in (("transformer", "base"), ("transformer_2", "base2")):
        got = WanTransformer3DModel.from_pretrained(out / sub).state_dict()
        for n, t in got.items():
            assert torch.equal(t, sd[base][n] + (sd["student"][n] - sd["teacher"][n])), (sub, n)


def test_dry_run_lists_what_would_change(models, tmp_path, capsys):
    root, sd = models
    assert _tool().main(["--student", str(root / "student"), "--teacher", str(root / "teacher"),
                         "--base", str(root / "base"), "--dry-run", "--exclude", "^proj_out"]) == 0
    out = capsys.readouterr().out
    n = len(sd["base"])
    assert f"{n - 3} of {n} tensors would change" in out  # one tensor unchanged, proj_out weight/bias kept
    assert "blocks.1.ffn.fc2.bias" not in out and "  blocks.0.attn1.to_q.weight [128, 128] " in out
    assert "kept from the base (--exclude): ['proj_out.weight', 'proj_out.bias']" in out
    assert not (tmp_path / "out").exists()


def test_exclude_lets_a_wider_base_take_a_narrower_delta(models, tmp_path):
    """A T2V delta onto an I2V base: its extra input channels and image branch keep the base's values."""
    root, sd = models
    args = ["--student", str(root / "student"), "--teacher", str(root / "teacher"), "--base", str(root / "i2v"),
            "--out", str(tmp_path / "out")]
    tool = _tool()
    assert tool.main(args) == 2
    assert tool.main(args + ["--exclude", r"^(patch_embedding|image_embedding)\.|\.add_[kv]_proj\.|norm_added_k"]) == 0
    got = WanTransformer3DModel.from_pretrained(tmp_path / "out").state_dict()
    assert torch.equal(got["patch_embedding.weight"], sd["i2v"]["patch_embedding.weight"])
    assert torch.equal(got["blocks.0.attn2.add_k_proj.weight"], sd["i2v"]["blocks.0.attn2.add_k_proj.weight"])
    n = "blocks.0.attn2.to_k.weight"
    assert torch.equal(got[n], sd["i2v"][n] + (sd["student"][n] - sd["teacher"][n]))


def test_bad_input_is_one_line_and_exit_2(models, tmp_path, capsys):
    root, _ = models
    base = ["--student", str(root / "student"), "--teacher", str(root / "teacher")]
    tool = _tool()

    def err(args):
        assert tool.main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    out = str(tmp_path / "out")
    msg = err(base + ["--base", str(root / "wide"), "--out", out])
    assert msg == ("merge_delta.py: error: blocks.0.ffn.fc1.weight differs in shape: base (128, 128), "
                   "student (256, 128), teacher (256, 128)")
    msg = err(base + ["--base", str(root / "i2v"), "--out", out])
    assert msg.startswith("merge_delta.py: error: patch_embedding.proj.weight differs in shape: base (128, 36, 1, 2, 2)")
    assert not os.path.exists(out)
    assert "--scale must be a finite number" in err(base + ["--base", str(root / "base"), "--out", out, "--scale", "nan"])
    assert "--out is required (or --dry-run)" in err(base + ["--base", str(root / "base")])
    assert "is not a regular expression" in err(base + ["--base", str(root / "base"), "--dry-run", "--exclude", "("])
    assert "selects from a training checkpoint" in err(base + ["--base", str(root / "base"), "--dry-run",
                                                              "--student-weights", "ema"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert "exists and is not empty; pass --overwrite" in err(base + ["--base", str(root / "base"),
                                                                     "--out", str(tmp_path / "full")])
    assert "no such file or directory" in err(base + ["--base", str(tmp_path / "nope"), "--out", out])


@pytest.mark.slow
def test_mismatch_exits_2_in_a_real_process(models, tmp_path):
    """The command line itself: exit code 2, one stderr line, nothing written."""
    root, _ = models
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge_delta.py"), "--student",
                        str(root / "student"), "--teacher", str(root / "teacher"), "--base", str(root / "wide"),
                        "--out", str(out)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["merge_delta.py: error: blocks.0.ffn.fc1.weight differs in shape: "
                                             "base (128, 128), student (256, 128), teacher (256, 128)"]
    assert not out.exists()
