"""What the data tools share: torchrun rank info, shard assignment, input manifests, and
progress lines that read well in a SLURM log (plain lines, counts and rates, no ``\\r``).

Work is cut into shards by input position (shard s = items [s K, (s+1) K)), and rank r of
W takes the shards s with s % W == r, so the output does not depend on the number of
ranks, and a rerun skips the shards already complete.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
VIDEO_COLUMNS = ("video", "path", "file", "filename", "video_path", "file_path", "videos")
CAPTION_COLUMNS = ("caption", "text", "prompt", "captions", "description")
IMAGE_COLUMNS = ("image", "image_path", "first_frame", "img", "images")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "RankInfo":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def shards(self, num_shards: int) -> list[int]:
        return list(range(self.rank, num_shards, self.world))

    def default_device(self) -> str:
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def quiet_hub() -> None:
    """Offline, and no tqdm bars (carriage returns) from diffusers / transformers / the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:
        pass
    try:
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
    except Exception:
        pass


def _fmt_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


class Progress:
    """``[tool r/W] shard 3/25 | 300 ok, 3 bad (too_short 2, unreadable 1) | 2.10 samples/s | eta 0:12:30``."""

    def __init__(self, tool: str, ranks: RankInfo, num_shards: int, interval: float = 30.0, stream=None):
        self.prefix = f"[{tool} {ranks.rank}/{ranks.world}]"
        self.num_shards, self.interval = num_shards, float(interval)
        self.stream = stream or sys.stdout
        self.t0 = self.last = time.time()
        self.ok, self.bad = 0, Counter()
        self.shards_done, self.shards_skipped = 0, 0

    def info(self, msg: str) -> None:
        print(f"{self.prefix} {msg}", file=self.stream, flush=True)

    def warn(self, msg: str) -> None:
        print(f"warning: {self.prefix} {msg}", file=sys.stderr, flush=True)

    def sample(self, ok: bool, reason: str | None = None) -> None:
        if ok:
            self.ok += 1
        else:
            self.bad[reason or "bad"] += 1
        if time.time() - self.last >= self.interval:
            self.line()

    def shard(self, skipped: bool = False) -> None:
        if skipped:
            self.shards_skipped += 1
        else:
            self.shards_done += 1
        self.line()

    def line(self) -> None:
        self.last = time.time()
        el = self.last - self.t0
        done = self.shards_done + self.shards_skipped
        rate = self.ok / el if el > 0 else 0.0
        todo = self.num_shards - done
        eta = _fmt_time(el / self.shards_done * todo) if self.shards_done and todo else ("0:00:00" if not todo else "?")
        bad = sum(self.bad.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.bad.items()))
        self.info(f"shard {done}/{self.num_shards} ({self.shards_skipped} already complete) | "
                  f"{self.ok} ok, {bad} bad{f' ({reasons})' if reasons else ''} | {rate:.2f} samples/s | "
                  f"elapsed {_fmt_time(el)} | eta {eta}")


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Item:
    row: int  # position in the input: the stable id of what the item becomes
    path: str | None  # the video (prepare_data) or the first-frame image (synthesize_data --task i2v)
    text: str | None


def _pick_column(fields, candidates, flag, given, source):
    if given:
        if given not in fields:
            raise ValueError(f"{source}: no column {given!r} ({flag}); columns are {list(fields)}")
        return given
    lower = {f.lower(): f for f in fields}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def read_manifest(source: str, video_column: str | None = None, caption_column: str | None = None,
                  need_video: bool = True, image_column: str | None = None, need_image: bool = False) -> list[Item]:
    """Items of a CSV/TSV, JSONL or JSON manifest, a text file (one prompt per line, when
    ``need_video`` is False), or a directory of videos with sidecar ``.txt`` captions.
    Relative video paths are resolved against the manifest's directory; a missing caption
    becomes ``text=None`` (skipped and counted by the tools, not an error here).
    ``need_image`` (prompt + image pairs, no video): ``path`` is the row's image, from an image
    column (``image_column`` or one of IMAGE_COLUMNS); a row without one is an error."""
    if need_image and need_video:
        raise ValueError("read_manifest: a row holds a video or a first-frame image, not both")
    if os.path.isdir(source):
        if not need_video:
            raise ValueError(f"{source}: expected a prompt file (.txt, .jsonl, .csv), got a directory")
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs
                       if f.lower().endswith(VIDEO_EXTENSIONS))
        if not paths:
            raise ValueError(f"{source}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in this directory")
        items = []
        for i, p in enumerate(paths):
            side = os.path.splitext(p)[0] + ".txt"
            text = open(side, encoding="utf-8").read().strip() if os.path.isfile(side) else None
            items.append(Item(i, p, text or None))
        return items
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such file or directory")
    base = os.path.dirname(os.path.abspath(source))
    low = source.lower()
    if low.endswith((".jsonl", ".json")):
        with open(source, encoding="utf-8") as f:
            if low.endswith(".json"):
                rows = json.load(f)
                if not isinstance(rows, list):
                    raise ValueError(f"{source}: expected a JSON list of objects")
            else:
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as e:
                            raise ValueError(f"{source}:{n}: not JSON: {e}") from e
        fields = sorted({k for r in rows if isinstance(r, dict) for k in r})
    elif low.endswith((".csv", ".tsv")):
        with open(source, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if low.endswith(".tsv") else ",")
            rows = list(reader)
            fields = reader.fieldnames or []
    elif need_image:
        raise ValueError(f"{source}: a prompt file with one prompt per line has no image column; prompt + image pairs "
                         "need a .csv/.tsv/.jsonl/.json manifest with an image and a prompt column")
    elif not need_video:  # plain prompts, one per line
        with open(source, encoding="utf-8") as f:
            return [Item(i, None, line.strip() or None) for i, line in enumerate(f.read().splitlines())]
    else:
        raise ValueError(f"{source}: unknown manifest type; use .csv, .tsv, .jsonl, .json or a directory of videos")
    vcol = _pick_column(fields, VIDEO_COLUMNS, "--video-column", video_column, source) if need_video else None
    if need_image:
        vcol = _pick_column(fields, IMAGE_COLUMNS, "--image-column", image_column, source)
        if vcol is None:
            raise ValueError(f"{source}: no image column (tried {', '.join(IMAGE_COLUMNS)}; set --image-column); "
                             f"columns are {list(fields)}")
    ccol = _pick_column(fields, CAPTION_COLUMNS, "--caption-column", caption_column, source)
    if need_video and vcol is None:
        raise ValueError(f"{source}: no video column (tried {', '.join(VIDEO_COLUMNS)}; set --video-column); "
                         f"columns are {list(fields)}")
    if ccol is None:
        raise ValueError(f"{source}: no caption column (tried {', '.join(CAPTION_COLUMNS)}; set --caption-column); "
                         f"columns are {list(fields)}")
    items = []
    for i, r in enumerate(rows):
        r = r if isinstance(r, dict) else {}
        path = r.get(vcol) if vcol else None
        if need_image and not path:
            raise ValueError(f"{source}: row {i} has no image (column {vcol!r})")
        if path:
            path = str(path)
            path = path if os.path.isabs(path) else os.path.join(base, path)
        text = r.get(ccol)
        text = str(text).strip() if text is not None else None
        items.append(Item(i, path, text or None))
    if not items:
        raise ValueError(f"{source}: the manifest has no rows")
    return items


def barrier_and_sum(values: list[int], ranks: RankInfo) -> list[int]:
    """Sum integers over torchrun ranks (gloo; a long timeout: ranks finish far apart)."""
    if ranks.world == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    if created:
        # A gloo group left alive until interpreter exit can abort the process
        # ("terminate called without an active exception") after all work is done.
        dist.barrier()
        dist.destroy_process_group()
    return t.tolist()
