"""A two-expert teacher source (Wan2.2 A14B) as ``tools/convert_checkpoint.py import`` writes it:
``DIR/experts.json`` (the boundary and the experts' folders) with ``DIR/high_noise`` and
``DIR/low_noise``, each a model checkpoint of its own. Checked before anything is built: the
boundary in (0, 1), both folders present, one architecture for both; every failure is a
``ValueError`` whose one line names the file and what was expected.

Student and fake score are one network each, initialized from the low-noise expert (why:
``training.model_building.build_models``), so ``weights`` are the low-noise expert's and the
high-noise expert's are kept beside them for the teacher only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..models.config import WanConfig
from .loading import open_source, read_full_state_dict

EXPERTS_FILE = "experts.json"
EXPERT_KEYS = ("high_noise", "low_noise")


@dataclass
class ExpertTeacherSource:
    config: WanConfig
    boundary_ratio: float
    weights: dict  # the low-noise expert's: the student's and fake score's start as well
    high_noise_weights: dict
    provenance: dict


def is_expert_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPERTS_FILE))


def read_expert_source(path: str) -> ExpertTeacherSource:
    """Both experts' weights in memory, after the cheap checks (boundary, folders, configs)."""
    info_path = os.path.join(path, EXPERTS_FILE)
    try:
        with open(info_path) as f:
            info = json.load(f)
        ratio = float(info["boundary_ratio"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path}: expected JSON with a numeric boundary_ratio ({e})") from e
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"{info_path}: boundary_ratio must be in (0, 1), got {ratio:g}")
    folders = {k: os.path.join(path, str(info.get(k, k))) for k in EXPERT_KEYS}
    for key, folder in folders.items():
        if not os.path.exists(folder):
            raise ValueError(f"the {key} expert {folder} is missing (experts.json names it; "
                             "tools/convert_checkpoint.py import writes high_noise/ and low_noise/)")
    sources = {k: open_source(f) for k, f in folders.items()}
    try:
        high, low = sources["high_noise"].config, sources["low_noise"].config
        if high != low:
            a, b = high.to_dict(), low.to_dict()
            diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
            raise ValueError(f"the two experts differ in architecture (high_noise vs low_noise: {diff}); "
                             "a two-expert teacher needs one architecture")
        low_weights = read_full_state_dict(sources["low_noise"])
        high_weights = read_full_state_dict(sources["high_noise"])
        provenance = {"source": os.path.abspath(path), "boundary_ratio": ratio, "student_init": "low_noise",
                      **{k: dict(s.provenance) for k, s in sources.items()}}
    finally:
        for s in sources.values():
            s.close()
    return ExpertTeacherSource(low, ratio, low_weights, high_weights, provenance)
