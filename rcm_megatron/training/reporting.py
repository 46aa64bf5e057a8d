"""Flags and settings of what training reports besides metrics.jsonl and TensorBoard scalars:
decoded video samples (``--log-video-interval``) and Weights & Biases (Megatron-LM's ``--wandb-*``).

Checked with the other flags, before any model is built: the VAE folder must hold an
``AutoencoderKLWan`` config, a prompt file must exist, and wandb must be importable when a
``--wandb-*`` flag is given (it is an optional dependency).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

VIDEO_STEPS = (1, 2, 4)


@dataclass(frozen=True)
class VideoLogConfig:
    """Every ``interval`` iterations: the student's 1/2/4-step samples of fixed prompts and seeds,
    decoded by the VAE at ``vae``; the teacher's ``teacher_steps``-step reference once."""

    interval: int | None = None
    vae: str | None = None
    context_file: str | None = None  # {'context': [N,L,D] or list of [L_i,D]}; default: the first logged batch
    num_prompts: int = 2
    teacher_steps: int = 8
    fps: int = 16

    def validate(self) -> None:
        if self.interval is None:
            if self.vae is not None or self.context_file is not None:
                raise ValueError("--vae / --log-video-context are used by --log-video-interval N, which is not set")
            return
        if self.interval < 1:
            raise ValueError(f"--log-video-interval must be a positive integer, got {self.interval}")
        if self.vae is None:
            raise ValueError("--log-video-interval needs --vae PATH (an AutoencoderKLWan folder or a Wan pipeline "
                             "folder with vae/)")
        from ..data.encoders import _component

        if not os.path.isdir(self.vae):
            raise ValueError(f"--vae {self.vae}: no such directory")
        cfg_path = os.path.join(_component(self.vae, "vae"), "config.json")
        try:
            with open(cfg_path) as f:
                name = json.load(f).get("_class_name")
        except (OSError, ValueError) as e:
            raise ValueError(f"--vae {self.vae}: cannot read {cfg_path} ({e})") from e
        if name != "AutoencoderKLWan":
            raise ValueError(f"--vae {self.vae}: {cfg_path} is for {name}, expected AutoencoderKLWan")
        if self.context_file is not None and not os.path.isfile(self.context_file):
            raise ValueError(f"--log-video-context {self.context_file}: no such file")
        if self.num_prompts < 1 or self.teacher_steps < 0:
            raise ValueError(f"--log-video-prompts must be >= 1 and --log-video-teacher-steps >= 0, got "
                             f"{self.num_prompts} and {self.teacher_steps}")


@dataclass(frozen=True)
class WandbConfig:
    """Megatron-LM's flags: on when ``project`` is set; the run is named ``exp_name`` and keeps its
    files in ``save_dir`` (default LOG_DIR/wandb)."""

    project: str | None = None
    exp_name: str | None = None
    save_dir: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.project)

    def validate(self) -> None:
        if not self.enabled:
            if self.exp_name or self.save_dir:
                raise ValueError("--wandb-exp-name / --wandb-save-dir need --wandb-project NAME")
            return
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--wandb-project {self.project}: the wandb package is not installed "
                             f"(pip install wandb), or drop the --wandb-* flags ({e})") from e


@dataclass(frozen=True)
class ReportingConfig:
    video: VideoLogConfig = VideoLogConfig()
    wandb: WandbConfig = WandbConfig()


def add_reporting_flags(g) -> None:
    g.add_argument("--log-video-interval", type=int, default=None,
                   help="every N iterations: the student's 1/2/4-step samples decoded by --vae, as TensorBoard "
                        "videos and a frame grid (the teacher's reference once)")
    g.add_argument("--vae", default=None, help="AutoencoderKLWan folder (or a Wan pipeline folder) for --log-video-interval")
    g.add_argument("--log-video-context", default=None,
                   help="fixed prompts: a .pt {'context': [N,L,D] or list of [L,D]} (default: the first logged batch's)")
    g.add_argument("--log-video-prompts", type=int, default=2, help="prompts per video log (default 2)")
    g.add_argument("--log-video-teacher-steps", type=int, default=8,
                   help="Euler steps (with CFG) of the teacher's reference videos, logged once (0: none)")
    g.add_argument("--wandb-project", default=None, help="Weights & Biases project (off unless set)")
    g.add_argument("--wandb-exp-name", default=None, help="Weights & Biases run name")
    g.add_argument("--wandb-save-dir", default=None, help="Weights & Biases files (default LOG_DIR/wandb)")


def reporting_config(args) -> ReportingConfig:
    """ValueError naming the flag when a setting is unusable."""
    out = ReportingConfig(
        VideoLogConfig(args.log_video_interval, args.vae, args.log_video_context, args.log_video_prompts,
                       args.log_video_teacher_steps),
        WandbConfig(args.wandb_project, args.wandb_exp_name, args.wandb_save_dir))
    out.video.validate()
    out.wandb.validate()
    return out
