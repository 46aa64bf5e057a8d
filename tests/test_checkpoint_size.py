"""What a training checkpoint holds: the per-component bytes of a real tiny run's saved state
match the parameter count's expectation (weights, fp32 EMA, AdamW moments of the student and the
fake score), the frozen teacher is not in it, the files on disk are that payload, and the trainer's
log line says the size, the time and the rate. Also the writer's parallel files: the same state
written by 1 and 3 threads loads back identically."""

import os
import re

import pytest
import torch

from rcm_megatron.checkpointing.save_report import expected_bytes, state_bytes

pytestmark = pytest.mark.slow  # a tiny training run and saves (~15 s)


def load_pipeline():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "pipeline",
                        "run_pipeline.py")
    spec = importlib.util.spec_from_file_location("run_pipeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tensor_ptrs(sd) -> set:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {v.data.untyped_storage().data_ptr() for v in nested_values(sd) if isinstance(v, ShardedTensor)}


def test_checkpoint_components_match_parameter_count_and_hold_no_teacher(tmp_path, capsys):
    from rcm_megatron.training import train_state
    from rcm_megatron.training.arguments import parse_args
    from rcm_megatron.training.trainer import Trainer

    save = str(tmp_path / "ck")
    train, model_cfg, rcm_cfg, par = parse_args([
        "--model", "tiny", "--device", "cpu", "--train-iters", "1", "--micro-batch-size", "1",
        "--global-batch-size", "1", "--rollout-max-steps", "2", "--save", save, "--log-dir", str(tmp_path / "log")])
    trainer = Trainer(train, model_cfg, rcm_cfg, par)
    trainer.run()
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("saved checkpoint at iteration 1")]
    assert line and re.search(r": \d+\.\d\d GB in \d+\.\d s \([\d.]+ GB/s; build .* plan .* write .* commit", line[0]), line
    (tmp_path / "pretrain.log").write_text("\n".join(line) + "\n")  # what examples/pipeline records of it
    parsed = load_pipeline().checkpoint_save(str(tmp_path / "pretrain.log"))
    assert parsed["iteration"] == 1 and parsed["seconds"] > 0 and "commit" in parsed["phases"]

    n = sum(p.numel() for p in trainer.student.parameters())
    sd = train_state.sharded_state_dict(trainer)
    got = state_bytes(sd)
    assert got == expected_bytes(n, "local", bf16=False, fake_score=True)
    assert not any(k.startswith("teacher") for k in sd)
    teacher = {p.untyped_storage().data_ptr() for p in trainer.teacher.parameters()}
    assert teacher and not teacher & _tensor_ptrs(sd)  # no teacher tensor is saved under another name

    folder = os.path.join(save, "iter_0000001")
    shards = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".distcp"))
    payload = sum(got.values())
    tensors = len(_tensor_ptrs(sd))
    assert payload <= shards <= payload + 2048 * 4 * tensors  # torch.save's per-tensor zip headers only
    assert trainer.checkpoints.report.bytes >= shards


def test_wan_1_3b_breakdown_is_32_bytes_a_parameter():
    """The shipped Wan-1.3B configs (bf16, distributed optimizer): 2 + 4 + 12 (student) + 2 + 12 (fake)."""
    from rcm_megatron.checkpointing.sources import full_shapes
    from rcm_megatron.models.config import preset

    n = sum(torch.Size(s).numel() for s in full_shapes(preset("wan-1.3b")).values())
    parts = expected_bytes(n, "megatron", bf16=True)
    assert parts["student"] == 2 * n and parts["ema"] == 4 * n and parts["opt_student/param"] == 4 * n
    assert sum(parts.values()) == 32 * n and round(32 * n / 1e9, 1) == 45.4


def test_parallel_writer_threads_give_the_same_checkpoint(tmp_path):
    from rcm_megatron.checkpointing import sharded_state as ss
    from rcm_megatron.checkpointing.dist_io import load_sharded, process_group
    from rcm_megatron.checkpointing.save import CheckpointManager
    from rcm_megatron.models import WanDiT
    from rcm_megatron.models.config import preset

    torch.manual_seed(0)
    model = WanDiT(preset("tiny"))
    with process_group():
        for threads in (1, 3):
            root = str(tmp_path / f"t{threads}")
            mgr = CheckpointManager(root, async_save=False, thread_count=threads)
            mgr.save(5, {"student": ss.model_sharded_state_dict(model, "student")})
            files = [f for f in os.listdir(os.path.join(root, "iter_0000005")) if f.endswith(".distcp")]
            assert len(files) == threads
            blank = WanDiT(preset("tiny"))
            with torch.no_grad():
                for p in blank.parameters():
                    p.zero_()
            loaded = load_sharded(os.path.join(root, "iter_0000005"),
                                  {"student": ss.model_sharded_state_dict(blank, "student")})
            ss.copy_loaded_into_model(blank, loaded["student"])
            for (k, a), b in zip(model.state_dict().items(), blank.state_dict().values()):
                assert torch.equal(a, b), k
