"""examples/pipeline/run_pipeline.py --tiny end to end on CPU: real H.264/VP9 files, prepare_data,
pretrain with the shipped wan-1.3b.sh flags and decoded video samples in TensorBoard, generate.py
mp4s, export, and WanPipeline with the exported scheduler agreeing with generate.py at 1/2/4 steps."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("av")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("webdataset")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_pipeline(tmp_path):
    res = tmp_path / "result.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pipeline", "run_pipeline.py"), "--work",
                        str(tmp_path / "work"), "--tiny", "--results", str(res)],
                       capture_output=True, text=True, timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    out = json.loads(res.read_text())
    names = [s["stage"] for s in out["stages"]]
    assert names == ["videos", "models", "prepare", "pretrain", "generate", "generate_1step", "generate_2step",
                     "generate_4step", "export", "diffusers"]
    assert out["card"] == "cpu" and out["command"] and out["date"]
    work = tmp_path / "work"
    assert sorted(os.listdir(work / "videos")) == ["clip000.mp4", "clip001.webm", "clip002.mp4", "clip003.webm",
                                                   "manifest.csv"]
    stage = {s["stage"]: s for s in out["stages"]}
    assert stage["pretrain"]["iterations"] == 6 and stage["pretrain"]["tokens_per_sec"] > 0
    assert {"critic", "student"} <= set(stage["pretrain"]["phases"])  # past the shortened tangent warmup
    # the config's flags reached the trainer
    for flag in ("--recompute-granularity full", "--bf16", "--student-update-freq 5", "--cfg-scale 5"):
        assert flag in stage["pretrain"]["command"]
    tags = stage["pretrain"]["tensorboard_images"]
    for k in (1, 2, 4):
        assert tags[f"videos/student_{k}step/prompt0"] == [3, 6] and tags[f"frames/student_{k}step"] == [3, 6]
    assert tags["videos/teacher_4step/prompt0"] == [3]
    for s in ("prepare", "generate", "diffusers"):
        assert stage[s]["videos_per_sec"] > 0 and stage[s]["peak_rss_gib"] > 0
    assert {"student_0.mp4", "student_1.mp4", "diffusers_0.mp4", "diffusers_1.mp4"} <= set(os.listdir(work / "samples"))
    agree = out["generate_vs_diffusers"]
    assert agree["ok"] and agree["dtype"] == "fp32"
    for key in ("1_step", "2_step", "4_step", "text_4_step"):
        assert agree[key]["rel_l2"] < 1e-4, (key, agree[key])
    assert "generate.py vs WanPipeline, 4 step: relative L2" in p.stdout
