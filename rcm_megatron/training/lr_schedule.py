"""Learning-rate schedules of the trained models: Megatron-LM's flags, megatron-core's scheduler.

The arithmetic is megatron-core's ``OptimizerParamScheduler`` (linear warmup from
``--lr-warmup-init``, then constant / linear / cosine / inverse-square-root / WSD decay to
``--min-lr`` over ``--lr-decay-iters``); this module only holds the validated settings, builds
one scheduler per optimizer and decides, on resume, whether the checkpoint's schedule and
this run's flags may be combined (Megatron-LM's ``--override-opt_param-scheduler`` /
``--use-checkpoint-opt_param-scheduler`` semantics, with an error naming the flags instead
of an assertion).

rCM trains two models at different learning rates (student and fake score): both follow the
same schedule *shape* on the iteration axis; the fake score's peak, floor and warmup start
are the student's scaled by lr_fake_score / lr_student. Schedules advance once per training
iteration, whichever model that iteration trained (so ``--lr-decay-iters`` counts iterations,
like ``--train-iters``). Weight decay is constant (the method's).
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
# Scheduler state fields that change the learning rate of a resumed run, and the flag of each.
_CHECKED = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
            "lr_decay_steps": "--lr-decay-iters", "lr_decay_style": "--lr-decay-style"}


@dataclass(frozen=True)
class LRScheduleConfig:
    decay_style: str = "constant"
    warmup_iters: int = 0
    warmup_init: float = 0.0
    decay_iters: int | None = None  # None: --train-iters
    min_lr: float = 0.0  # of the student (or of the --mode teacher model)
    wsd_decay_iters: int | None = None
    wsd_decay_style: str = "exponential"
    override: bool = False  # --override-opt_param-scheduler: this run's flags win on resume
    use_checkpoint: bool = False  # --use-checkpoint-opt_param-scheduler: the checkpoint's win

    def validate(self, max_lr: float, train_iters: int) -> None:
        """Raise ValueError naming the flag; max_lr is the student's (or teacher's) peak lr."""
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {self.decay_style!r}")
        if self.warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {self.warmup_iters}")
        decay = self.decay_iters if self.decay_iters is not None else train_iters
        if decay < 1:
            raise ValueError(f"--lr-decay-iters must be a positive integer, got {decay}")
        if self.warmup_iters >= decay:
            raise ValueError(f"--lr-warmup-iters ({self.warmup_iters}) must be smaller than --lr-decay-iters "
                             f"({decay}{'' if self.decay_iters is not None else ', from --train-iters'})")
        if not 0 <= self.min_lr <= max_lr:
            raise ValueError(f"--min-lr must be in [0, lr={max_lr:g}], got {self.min_lr:g}")
        if not 0 <= self.warmup_init <= max_lr:
            raise ValueError(f"--lr-warmup-init must be in [0, lr={max_lr:g}], got {self.warmup_init:g}")
        if self.decay_style == "WSD":
            if self.wsd_decay_iters is None or not 0 < self.wsd_decay_iters <= decay:
                raise ValueError(f"--lr-decay-style WSD needs --lr-wsd-decay-iters in [1, {decay}], got "
                                 f"{self.wsd_decay_iters}")
            if self.wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(f"--lr-wsd-decay-style must be one of {WSD_DECAY_STYLES}, got "
                                 f"{self.wsd_decay_style!r}")
        if self.override and self.use_checkpoint:
            raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude "
                             "each other")


def build_scheduler(optimizer, cfg: LRScheduleConfig, *, max_lr: float, scale: float, weight_decay: float,
                    train_iters: int):
    """megatron-core scheduler for one optimizer (a torch optimizer or a megatron-core one).

    ``scale`` multiplies peak, floor and warmup start (1 for the student, lr_fake / lr_student
    for the fake score). Setting the lr of every param group happens here (step 0).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = cfg.decay_iters if cfg.decay_iters is not None else train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=cfg.warmup_init * scale, max_lr=max_lr, min_lr=cfg.min_lr * scale,
        lr_warmup_steps=cfg.warmup_iters, lr_decay_steps=decay, lr_decay_style=cfg.decay_style,
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        # Resume compatibility is decided by check_resume (a clear error instead of an assert);
        # what it lets through is loaded with these semantics.
        use_checkpoint_opt_param_scheduler=cfg.use_checkpoint, override_opt_param_scheduler=not cfg.use_checkpoint,
        wsd_decay_steps=cfg.wsd_decay_iters, lr_wsd_decay_style=cfg.wsd_decay_style)


def schedule_fields(cfg: LRScheduleConfig, *, max_lr: float, scale: float, train_iters: int) -> dict:
    """The scheduler ``state_dict()`` fields that shape the lr, as this run's flags give them
    (computed without building anything, so a resume can be checked before any allocation)."""
    return {"max_lr": float(max_lr), "min_lr": cfg.min_lr * scale, "lr_warmup_steps": cfg.warmup_iters,
            "lr_decay_steps": cfg.decay_iters if cfg.decay_iters is not None else train_iters,
            "lr_decay_style": cfg.decay_style}


def check_resume(saved: dict, current: dict, cfg: LRScheduleConfig, where: str) -> None:
    """Refuse a resume whose schedule differs from the checkpoint's, unless a flag says who wins.

    ``saved`` is a scheduler ``state_dict()``, ``current`` its ``schedule_fields``. The decay
    length is ignored when both schedules are constant (a longer --train-iters then changes
    nothing).
    """
    if cfg.override or cfg.use_checkpoint:
        return
    constant = saved.get("lr_decay_style") == current["lr_decay_style"] == "constant"
    for key, flag in _CHECKED.items():
        if key == "lr_decay_steps" and constant:
            continue
        if saved.get(key) != current[key]:
            raise ValueError(
                f"{where}: the checkpoint's learning-rate schedule has {key}={saved.get(key)!r}, this run's flags "
                f"give {current[key]!r} ({flag}); pass the same value, or --override-opt_param-scheduler to use "
                "this run's schedule from the saved step, or --use-checkpoint-opt_param-scheduler to keep the "
                "checkpoint's")
