"""A two-expert teacher source (Wan2.2 A14B) as ``tools/convert_checkpoint.py import`` writes it:
``DIR/experts.json`` (the boundary and the experts' folders) with ``DIR/high_noise`` and
``DIR/low_noise``, each a model checkpoint of its own. Checked before anything is built: the
boundary in (0, 1), both folders present, one architecture for both; every failure is a
``ValueError`` whose one line names the file and what was expected.

Student and fake score are one network each, initialized from the expert ``init`` names
(``--expert-init``, default the low-noise one; why: ``training.model_building.build_models``), so
``weights`` are that expert's; both experts' weights are kept for the teacher. ``provenance``
records the choice as ``student_init``, which a resume must match (``check_resume_init``).
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
    weights: dict  # the --expert-init expert's: the student's and fake score's start
    high_noise_weights: dict
    low_noise_weights: dict
    provenance: dict


def is_expert_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPERTS_FILE))


def read_expert_source(path: str, init: str = "low_noise") -> ExpertTeacherSource:
    """Both experts' weights in memory, after the cheap checks (boundary, folders, configs); ``init``
    (one of EXPERT_KEYS) names the expert whose weights start student and fake score."""
    if init not in EXPERT_KEYS:
        raise ValueError(f"the initializing expert must be one of {', '.join(EXPERT_KEYS)}, got {init!r}")
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
        provenance = {"source": os.path.abspath(path), "boundary_ratio": ratio, "student_init": init,
                      **{k: dict(s.provenance) for k, s in sources.items()}}
    finally:
        for s in sources.values():
            s.close()
    weights = high_weights if init == "high_noise" else low_weights
    return ExpertTeacherSource(low, ratio, weights, high_weights, low_weights, provenance)


def check_resume_init(resume_teacher_meta: dict, init: str) -> str | None:
    """The one-line refusal when a resumed run names another initializing expert than the one its
    checkpoint started from (else None). The resumed weights come from the checkpoint either way, so
    a differing --expert-init would change nothing but leave the provenance saying something false;
    checkpoints written before the choice existed started from the low-noise expert."""
    saved = (resume_teacher_meta or {}).get("student_init", "low_noise")
    if saved == init:
        return None
    return (f"--expert-init {init}: the checkpoint's student and fake score started from the {saved} expert; "
            f"a resume keeps its start (pass --expert-init {saved}, or --save a new run)")
