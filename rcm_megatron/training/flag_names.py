"""Flag names next to the config fields they set. A flag is named after its field where
Megatron-LM has no name for it (``--tangent-warmup-iters`` sets ``tangent_warmup_iters``);
Megatron-LM's names are kept where they exist (``--lr``, ``--clip-grad``)."""

from __future__ import annotations

# Flags named after the field they set where Megatron-LM has no name for it; the earlier
# spellings stay accepted (examples and recorded session scripts use them) but are not listed.
RENAMED_FLAGS = {"--fake-score-lr": "--lr-fake-score", "--tangent-warmup": "--tangent-warmup-iters",
                 "--rollout-steps": "--rollout-max-steps", "--ema-width": "--ema-sigma-rel"}
RENAMED_TYPES = {"--lr-fake-score": float, "--tangent-warmup-iters": int, "--rollout-max-steps": int,
                 "--ema-sigma-rel": float}

# The method flags (RCMConfig field -> flag) whose preset values are printed at start when not given.
METHOD_FLAGS = {"lr_student": "--lr", "lr_fake_score": "--lr-fake-score", "cfg_scale": "--cfg-scale",
                "student_update_freq": "--student-update-freq", "tangent_warmup_iters": "--tangent-warmup-iters",
                "rollout_max_steps": "--rollout-max-steps", "ema_sigma_rel": "--ema-sigma-rel", "p_g": "--p-g",
                "p_d": "--p-d", "scm_loss_scale": "--scm-loss-scale", "dmd_loss_scale": "--dmd-loss-scale"}
_OTHER_FIELD_FLAGS = {"mode": "--method", "grad_clip_norm": "--clip-grad", "weight_decay": "--weight-decay",
                      "seed": "--seed"}


def flag_error(message: str, given: set) -> str:
    """RCMConfig's 'RCMConfig.field: ...' as '--flag: ...' for a field set by a flag."""
    for f in given:
        flag = METHOD_FLAGS.get(f) or _OTHER_FIELD_FLAGS.get(f)
        if flag and message.startswith(f"RCMConfig.{f}:"):
            return flag + message[len(f"RCMConfig.{f}"):]
    return message.replace("RCMConfig.", "method setting ")


def format_implied(train) -> str:
    """The block printed at start: what a preset or the teacher chose, as flags."""
    flags = " ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                     for k, v in train.implied.items())
    return f"settings from {train.implied_by} (a flag overrides any of them):\n  {flags}"
