"""Per-iteration metrics: TensorBoard events, ``metrics.jsonl``, a one-line progress print and,
with ``--wandb-project``, the same scalars (same tags) to Weights & Biases.

Only the logging rank (global rank 0) writes. Each record goes to metrics.jsonl as one whole
line in one ``write`` of an ``O_APPEND`` descriptor, flushed to disk, so a crash or a full disk
leaves at most a torn last line. A resumed run appends after dropping lines past the resume
iteration (and a torn or garbled line, with a warning), so the file always reads as one run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsLogger:
    def __init__(self, log_dir: str | None, log_interval: int = 10, enabled: bool = True, resume_iteration: int = 0,
                 wandb=None, run_config: dict | None = None):
        self.enabled = enabled and log_dir is not None
        self.log_interval = max(1, int(log_interval))
        self.log_dir = log_dir
        self._tb = None
        self._jsonl: int | None = None
        self._t0 = time.time()
        if self.enabled:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "metrics.jsonl")
            _truncate_after(path, resume_iteration)
            self._jsonl = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=log_dir, purge_step=resume_iteration + 1 if resume_iteration else None)
            except ImportError:  # tensorboard is a dependency; keep logging if a minimal env lacks it
                print("warning: tensorboard not installed; writing metrics.jsonl only", file=sys.stderr)
        self._wandb = _start_wandb(wandb, log_dir, run_config) if self.enabled and wandb is not None else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        _write_line(self._jsonl, json.dumps(clean, sort_keys=True) + "\n")
        it = clean["iteration"]
        if self._tb is not None:
            for k, v in clean.items():
                if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(_tb_tag(k), v, it)
        if self._wandb is not None:
            self._wandb.log({_tb_tag(k): v for k, v in clean.items() if k != "iteration"
                             and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=it)
        if it % self.log_interval == 0 or it == 1 or record.get("consecutive_skipped_steps"):  # every skipped step
            losses = " ".join(f"{k}={_num(v, '.4g')}" for k, v in record.items() if k.startswith("loss"))
            print(f"iter {it:6d} | {clean.get('phase', ''):7s} | {losses} | grad_norm={_num(record.get('grad_norm'), '.3g')}"
                  f"{_skips(record)} | lr={_num(record.get('lr', 0), '.3g')}"
                  f" | {_num(record.get('samples_per_sec', 0), '.2f')} samples/s"
                  f" | elapsed {time.time() - self._t0:.0f}s", flush=True)

    def add_image(self, tag: str, image, iteration: int) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image, iteration, dataformats="HWC")

    def add_video(self, tag: str, frames, iteration: int, fps: int = 16) -> None:
        """uint8 frames [T, H, W, 3] as TensorBoard's video summary (an animated GIF image, what
        ``SummaryWriter.add_video`` writes; encoded with Pillow, as add_video's moviepy is rarely installed)."""
        if self._tb is not None:
            self._tb._get_file_writer().add_summary(gif_summary(tag, frames, fps), iteration)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._jsonl is not None:
            os.close(self._jsonl)
            self._jsonl = None
        if self._tb:
            self._tb.close()


def _start_wandb(cfg, log_dir: str, run_config: dict | None):
    """A Weights & Biases run for ``reporting.WandbConfig`` ``cfg`` (None when not enabled)."""
    if not cfg.enabled:
        return None
    import wandb

    save_dir = cfg.save_dir or os.path.join(log_dir, "wandb")
    os.makedirs(save_dir, exist_ok=True)
    return wandb.init(project=cfg.project, name=cfg.exp_name, dir=save_dir, config=run_config or {})


def gif_summary(tag: str, frames, fps: int):
    import io

    from PIL import Image
    from torch.utils.tensorboard.summary import Summary

    arr = frames.numpy() if hasattr(frames, "numpy") else frames
    images = [Image.fromarray(f) for f in arr]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0)
    h, w = arr.shape[1:3]
    return Summary(value=[Summary.Value(tag=tag, image=Summary.Image(height=h, width=w, colorspace=3,
                                                                     encoded_image_string=buf.getvalue()))])


def _skips(record: dict) -> str:
    """' | skipped N (K in a row)' once a step was skipped for non-finite gradients."""
    if not record.get("skipped_steps"):
        return ""
    return f" | skipped {record['skipped_steps']} ({record.get('consecutive_skipped_steps', 0)} in a row)"


def _num(v, spec: str) -> str:
    """Format a number for the progress line; non-finite values print as nan/inf."""
    if hasattr(v, "item"):
        v = v.item()
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _tb_tag(key: str) -> str:
    if key.startswith("loss"):
        return f"loss/{key}"
    return f"train/{key}"


def _write_line(fd: int, line: str) -> None:
    """One record in one write (a partial write, e.g. a full disk, is completed or raises), synced."""
    data = line.encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]
    os.fsync(fd)


def _truncate_after(path: str, iteration: int) -> None:
    """Drop records with iteration > ``iteration`` (work done after the checkpoint we resume from),
    and a torn or unreadable line (a crash or a full disk mid-write) with a warning."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    keep, changed = [], lines[-1] != b""  # no final newline: the next record must not join it
    for k, raw in enumerate(lines):
        if not raw.strip():
            changed = changed or (raw != b"" or k != len(lines) - 1)
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            where = "its torn last line" if k >= len(lines) - 2 else f"line {k + 1}, unreadable"
            print(f"warning: {path}: dropping {where} ({raw[:60]!r}{'...' if len(raw) > 60 else ''})",
                  file=sys.stderr, flush=True)
            changed = True
            continue
        if rec.get("iteration", 0) <= iteration:
            keep.append(raw + b"\n")
        else:
            changed = True
    if changed:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(keep)
        os.replace(tmp, path)
