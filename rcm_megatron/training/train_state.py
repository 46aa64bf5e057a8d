"""What a training checkpoint holds and how a run resumes from one: the checkpoint to load
(``--load``, or ``--save`` under ``--auto-resume``), its compatibility with this run (checked
before any model is built), the sharded state of a trainer (models, EMA share, optimizers,
schedulers, counters, data position, RNG) and loading it back.

The file format, commit protocol and resharding are megatron-core ``dist_checkpointing``
behind ``checkpoint.py``; this module only says what goes in.
"""

from __future__ import annotations

import torch

from ..checkpointing import sharded_state as ss
from ..checkpointing.dist_io import load_sharded, read_common
from ..checkpointing.errors import CheckpointError
from ..checkpointing.resume import resolve_resume, verified_resume
from . import lr_schedule
from .arguments import ArgumentError

CHECKPOINT_VERSION = 1


def resolve_load(train) -> str | None:
    """The committed checkpoint folder to resume from, or None for a fresh run (a fresh run into a
    --save that holds checkpoints is an error; ``checkpointing.resume``)."""
    try:
        return resolve_resume(train.load, train.save, train.auto_resume)
    except CheckpointError as e:
        raise ArgumentError(str(e)) from e


def verified_load_path(path: str, auto_resume: bool) -> str:
    """``path`` once its checksums verify on every rank; under --auto-resume the newest older
    checkpoint that verifies (the caller re-checks its compatibility)."""
    try:
        return verified_resume(path, fallback=auto_resume)
    except CheckpointError as e:
        raise ArgumentError(str(e)) from e


def check_resume_compatible(where: str, train, rcm, model_cfg, peak_lrs) -> dict:
    """The checkpoint's meta, after checking it was written by a compatible run (architecture,
    mode and method, lr schedule) with one line naming what differs."""
    meta = read_common(where).get("meta", {})
    if meta.get("format") != "rcm-megatron-train" or meta.get("version") != CHECKPOINT_VERSION:
        raise ArgumentError(f"--load {where}: not an rcm-megatron training checkpoint (version {CHECKPOINT_VERSION})")
    want, got = model_cfg.to_dict(), meta.get("model_config") or {}
    if got != want:
        diff = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
        raise ArgumentError(f"--load {where}: checkpoint is for another architecture (differs in {diff}: "
                            f"{ {k: got.get(k) for k in diff} } vs this run's { {k: want.get(k) for k in diff} })")
    method = rcm.method if train.mode == "distill" else None
    if meta.get("mode") != train.mode or meta.get("method") != method:
        raise ArgumentError(f"--load {where}: checkpoint was written by --mode {meta.get('mode')} "
                            f"--method {meta.get('method')}, this run is --mode {train.mode} --method {method}")
    lr_student, lr_fake = peak_lrs
    for name, peak in (("student", lr_student), ("fake_score", lr_fake)):
        saved = (meta.get("lr_schedulers") or {}).get(name)
        if peak is None or saved is None:
            continue
        current = lr_schedule.schedule_fields(train.lr_schedule, max_lr=peak, scale=peak / lr_student,
                                              train_iters=train.train_iters)
        try:
            lr_schedule.check_resume(saved, current, train.lr_schedule, f"--load {where} ({name})")
        except ValueError as e:
            raise ArgumentError(str(e)) from e
    return meta


def _optimizer_format(trainer) -> str:
    return trainer.trained["student"].optimizer_format


def checkpoint_meta(trainer) -> dict:
    t, ctx = trainer, trainer.ctx
    return {"format": "rcm-megatron-train", "version": CHECKPOINT_VERSION, "iteration": t.iteration,
            "student_steps": t.student_steps, "skipped_steps": t.skipped_steps,
            "consecutive_skips": t.consecutive_skips, "last_good_save": t.last_good_save, "mode": t.train.mode,
            "method": t.rcm.method if t.train.mode == "distill" else None,
            "model_config": t.model_cfg.to_dict(), "rcm_config": t.rcm.to_dict(),
            "data": {"source": t.train.data or "synthetic", "latent_shape": list(t.dataset.latent_shape),
                     "text_len": t.dataset.text_len, "conditions": list(getattr(t.dataset, "conditions", ()))},
            "teacher": t.teacher_meta, "world_size": ctx.world_size,
            "optimizer_format": _optimizer_format(t),
            "lr_schedulers": {k: tm.scheduler.state_dict() for k, tm in t.trained.items()},
            "layout": {"tp": t.par.tensor_model_parallel_size, "cp": t.par.context_parallel_size,
                       "pp": t.par.pipeline_model_parallel_size, "dp": ctx.dp_size},
            "data_position": {"iteration": t.iteration, "global_batch": ctx.global_batch, "seed": t.train.seed,
                              "loader": t.batches.state_dict()}}


def sharded_state_dict(trainer, with_rng: bool = True, is_loading: bool = False) -> dict:
    t = trainer
    sd = {"meta": checkpoint_meta(t),
          "student": ss.model_sharded_state_dict(t.student, "student"),
          "ema": ss.tensors_sharded_state_dict(t.ema.shadow, t.student, "ema", dp_sharded=True),
          "ema_meta": {"sigma_rel": t.ema.sigma_rel, "num_updates": t.ema.num_updates},
          "opt_student": t.trained["student"].optimizer_sharded_state_dict("student", is_loading)}
    if t.fake is not None:
        sd["fake_score"] = ss.model_sharded_state_dict(t.fake, "fake_score")
        sd["opt_fake_score"] = t.trained["fake_score"].optimizer_sharded_state_dict("fake_score", is_loading)
    if with_rng:
        sd["rng"] = ss.rng_sharded_object("rng", {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
    return sd


def load_into(trainer, path: str, meta: dict) -> None:
    """Resume ``trainer`` (built, not yet run) from the checkpoint at ``path`` whose meta was checked."""
    t = trainer
    same_world = meta.get("world_size") == t.ctx.world_size
    fmt = _optimizer_format(t)
    if meta.get("optimizer_format", "torch-adamw") != fmt:
        raise ArgumentError(f"--load {path}: optimizer state was saved as {meta.get('optimizer_format')}, this "
                            f"run uses {fmt} (--use-distributed-optimizer must match the saving run)")
    loaded = load_sharded(path, sharded_state_dict(t, with_rng=same_world, is_loading=True))
    ss.copy_loaded_into_model(t.student, loaded["student"])
    for name, tensor in loaded["ema"].items():
        ss.copy_into(t.ema.shadow[name], tensor)
    t.ema.num_updates = int(loaded["ema_meta"]["num_updates"])
    t.trained["student"].load_optimizer_state_dict(loaded["opt_student"])
    if t.fake is not None:
        ss.copy_loaded_into_model(t.fake, loaded["fake_score"])
        t.trained["fake_score"].load_optimizer_state_dict(loaded["opt_fake_score"])
    # After the optimizers (their saved param groups carry an lr): the schedulers set it last.
    for name, tm in t.trained.items():  # compatibility checked in check_resume_compatible
        saved = meta.get("lr_schedulers", {}).get(name)
        if saved is None:  # written before schedulers were saved: constant lr, the old behaviour
            tm.scheduler.step(int(meta["iteration"]))
        else:
            tm.scheduler.load_state_dict(saved)
    if same_world and loaded.get("rng") is not None:
        torch.set_rng_state(loaded["rng"]["torch"])
    t.iteration, t.student_steps = int(meta["iteration"]), int(meta["student_steps"])
    t.skipped_steps = int(meta.get("skipped_steps", 0))
    t.consecutive_skips = int(meta.get("consecutive_skips", 0))
    # The loaded checkpoint itself when no skipped step was pending at its save, else the one before.
    t.last_good_save = t.iteration if t.consecutive_skips == 0 else meta.get("last_good_save")
    pos = meta.get("data_position", {})
    if pos.get("global_batch") != t.ctx.global_batch or pos.get("seed") != t.train.seed:
        raise ArgumentError(f"--load {path}: checkpoint used global batch {pos.get('global_batch')} and seed "
                            f"{pos.get('seed')}, this run {t.ctx.global_batch} and {t.train.seed}; the data "
                            "position would not resume exactly")
    t.batches.load_state_dict(pos.get("loader"))
