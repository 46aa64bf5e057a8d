"""The training loop: per iteration the step plan (which model trains, its micro-batches'
losses), the step, the metrics, and saves; the rCM schedule or flow-matching teacher
pretraining, with sharded checkpoints and exact resume.

Per iteration: the schedule names the trained model; every DP rank takes its slice of the
layout-independent global batch (``batches.py``), accumulates gradients over micro-batches
(losses are sums over samples divided by the *global* batch size, so data-parallel gradients
simply add), and the model's ``TrainedModel`` backend (``trained_model.py``: ``local_dp.py``,
or megatron-core's DDP + distributed optimizer in ``megatron_dp.py``) reduces gradients over
DP x CP, skips the step if they are non-finite, clips and steps; on student steps the power
EMA follows (each DP x CP rank keeps its size-balanced share of the shadow tensors), then both
learning-rate schedulers advance (``lr_schedule.py``).

With ``--pipeline-model-parallel-size`` > 1 each rank builds its stage of every model
(equal numbers of blocks; embeddings on the first stage, the head on the last) and an
iteration runs the pipelined step plan of ``pipeline_step.py`` over all its micro-batches:
forward-only sweeps make the targets, one 1F1B pass regresses the trained model. It composes
with TP (and SP), CP and DP: megatron-core's pipeline groups join the ranks of equal TP, CP and
DP rank, so each rank exchanges its own shard of the activations (under CP its zero-padded
sequence chunk) with the same rank of the neighbouring stages, and gradients are reduced over
DP x CP on every stage as without PP. The time embedding, held by every stage, has its
gradient summed over the stages; the gradient norm sums squares over TP, PP and counts every
parameter once; the losses, computed on the last stage (alike on its CP ranks), are broadcast
over the pipeline so global rank 0 logs them. SIGTERM / SIGUSR1 (SLURM pre-emption,
``signals.py``) and ``--exit-duration-in-mins`` end the run after a save at an iteration
boundary.

Elsewhere: checks before anything is built (``preflight.py``; resume compatibility and what a
checkpoint holds in ``train_state.py``), distributed init and rank
agreement (``rank_context.py``), the models and their optimizers (``model_building.py``),
TensorBoard sample grids (``sample_images.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from ..checkpointing.errors import CheckpointError
from ..checkpointing.save import CheckpointManager
from ..models import WanConfig
from ..parallel.config import ParallelConfig
from ..parallel.fsdp import reshard_all
from ..rcm import RCMConfig, critic_step, phase, student_step
from . import pipeline_step, train_state
from .arguments import TrainingConfig
from .batches import BatchSource
from .flow_matching import flow_matching_loss
from .metrics import MetricsLogger
from .model_building import build_models, build_trained_models, peak_lrs, sharded_ema
from .preflight import preflight
from .rank_context import RankContext
from .sample_images import log_samples, sampling_net
from .signals import StopRequests
from .throughput import memory_metrics, num_tokens, phase_flops, throughput_metrics
from .video_samples import VideoSampleLogger

CHECKPOINT_VERSION = train_state.CHECKPOINT_VERSION


class TrainingAborted(RuntimeError):
    """A run that must stop without saving (e.g. too many consecutive non-finite steps)."""


def non_finite_losses(losses: dict, totals: dict) -> dict:
    """A skipped step's loss terms: a term with invalid samples (``X_valid_frac`` < 1) is nan, not
    the masked sum over the valid ones (the method counts a non-finite sample as 0, which would
    read as a perfect step)."""
    return {k: float("nan") if totals.get(f"{k[len('loss_'):]}_valid_frac", 1.0) < 1.0 else v
            for k, v in losses.items()}


class Trainer:
    def __init__(self, train: TrainingConfig, model_cfg: WanConfig | None, rcm_cfg: RCMConfig, par: ParallelConfig):
        self.train, self.rcm, self.par = train, rcm_cfg, par
        self.device = torch.device(train.device)
        checked = preflight(train, model_cfg, rcm_cfg, par)  # before distributed init or any allocation
        self.model_cfg, self.dataset = checked.model_cfg, checked.dataset
        self.teacher_weights, self.teacher_meta = checked.teacher_weights, checked.teacher_meta
        self.load_path, self.resume_meta = checked.load_path, checked.resume_meta
        self.lease, self.expert_teacher = checked.lease, checked.expert_teacher

    # ------------------------------------------------------------------ setup
    def build(self) -> None:
        self.ctx = ctx = RankContext.initialize(self.par, self.device)
        self.rank, self.pipe = ctx.rank, ctx.pipe
        models = build_models(self.train, self.rcm, self.model_cfg, ctx, self.teacher_weights, self.expert_teacher)
        self.teacher, self.student, self.fake = models.teacher, models.student, models.fake
        self.trained = build_trained_models(self.train, self.rcm, self.model_cfg, self.par, ctx, models)
        self.ema = sharded_ema(self.student, self.rcm.ema_sigma_rel, ctx.dp_cp_group)
        self.batches = BatchSource(self.dataset, self.train, self.par.micro_batch_size, ctx, self.model_cfg)
        self.iteration, self.student_steps, self.skipped_steps, self.consecutive_skips = 0, 0, 0, 0
        self.last_good_save: int | None = None  # the newest checkpoint saved with no skipped step pending
        spread = ctx.dp_cp_group if self.train.ckpt_fully_parallel_save else None
        self.checkpoints = CheckpointManager(self.train.save, self.train.keep_last, on_commit=self._saved,
                                             parallel_group=spread) if self.train.save else None
        if self.load_path is not None:
            path = train_state.verified_load_path(self.load_path, self.train.auto_resume)
            if path != self.load_path:  # --auto-resume fell back to an older checkpoint that verifies
                self.resume_meta = train_state.check_resume_compatible(path, self.train, self.rcm, self.model_cfg,
                                                                       peak_lrs(self.train, self.rcm))
                self.load_path = path
            train_state.load_into(self, self.load_path, self.resume_meta)
            if self.rank == 0:
                print(f"resumed from {self.load_path} at iteration {self.iteration}", flush=True)
        self.batches.set_iteration(self.iteration)
        self.logger = MetricsLogger(self.train.log_dir, self.train.log_interval, enabled=self.rank == 0,
                                    resume_iteration=self.iteration, wandb=self.train.reporting.wandb,
                                    run_config=dataclasses.asdict(self.train))
        video = self.train.reporting.video
        self.videos = VideoSampleLogger(video, self.train.seed, self.rank == 0, self.device) if video.interval else None
        self.tokens = num_tokens(self.model_cfg, tuple(self.dataset.latent_shape))

    def save(self) -> None:
        """All checkpoint writes go through here. --keep-last rotation keeps the last checkpoint
        saved before the current run of skipped (non-finite) steps."""
        if self.checkpoints is not None:
            protect = [self.last_good_save] if self.consecutive_skips and self.last_good_save is not None else []
            try:
                self.checkpoints.save(self.iteration, lambda: train_state.sharded_state_dict(self), protected=protect)
            except CheckpointError as e:  # e.g. a full disk: the partial copy is gone, the previous one kept
                raise TrainingAborted(str(e)) from e
            if self.consecutive_skips == 0:
                self.last_good_save = self.iteration

    def _saved(self, report) -> None:
        """Rank 0, at each commit (asynchronous saves: when the write has finished)."""
        print(f"saved checkpoint at iteration {report.iteration} to {self.train.save}: {report.line()}", flush=True)

    # ------------------------------------------------------------------ one iteration
    def _autocast(self):
        if not self.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _step_plan(self, ph, batches, it: int) -> dict:
        """The losses of one micro-batch (PP = 1) or, pipelined, of the DP rank's whole batch."""
        nets = {k: tm.net for k, tm in self.trained.items()}
        student, fake = nets["student"], nets.get("fake_score")
        kw = dict(loss_normalizer=self.ctx.global_batch)
        if self.pipe.size > 1:
            link = self.ctx.link
            if self.train.mode != "distill":
                return pipeline_step.flow_matching_step(self.student, batches, self.train.seed, it, link, **kw)
            if ph.is_student:
                return pipeline_step.student_step(self.rcm, self.teacher, self.student, self.fake, batches, it, link,
                                                  phase=ph, **kw)
            return pipeline_step.critic_step(self.rcm, self.student, self.fake, batches, it, link, **kw)
        if self.train.mode != "distill":
            loss, _ = flow_matching_loss(student, batches.x0, batches.context, batches.uncond_context,
                                         batches.indices, self.train.seed, it, cond=batches.cond)
            loss = loss / self.ctx.global_batch
            loss.backward()
            return {"loss_flow_matching": loss.detach()}
        if ph.is_student:
            return student_step(self.rcm, self.teacher, student, fake, batches, it, phase=ph, **kw)
        return critic_step(self.rcm, student, fake, batches, it, **kw)

    def _one_iteration(self, it: int) -> dict:
        distill = self.train.mode == "distill"
        ctx = self.ctx
        ph = phase(self.rcm, it) if distill else None
        name = "student" if (not distill or ph.is_student) else "fake_score"
        trained = self.trained[name]
        trained.zero_grad()
        totals: dict[str, float] = {}
        t0 = time.perf_counter()
        first = None
        if self.pipe.size > 1:
            batches = list(self.batches.micro_batches(it))
            first = batches[0]
            with self._autocast(), trained.accumulate():
                out = self._step_plan(ph, batches, it)
            for k, v in out.items():  # diagnostics are means over this DP rank's batch already
                totals[k] = float(v) * (1.0 if k.startswith("loss") else 1.0 / ctx.dp_size)
        else:
            for batch in self.batches.micro_batches(it):
                first = batch if first is None else first
                with self._autocast(), trained.accumulate():
                    out = self._step_plan(ph, batch, it)
                for k, v in out.items():
                    w = 1.0 if k.startswith("loss") else 1.0 / (ctx.num_micro * ctx.dp_size)
                    totals[k] = totals.get(k, 0.0) + float(v) * w
        totals = ctx.reduce_totals(totals)
        record = {"iteration": it + 1, "phase": "teacher" if not distill else ph.model}
        stepped, grad_norm = trained.step()
        for m in (self.teacher, self.student, self.fake):  # ZeRO-3: free what forward-only passes left gathered
            reshard_all(m)
        if stepped:
            self.consecutive_skips = 0
            if name == "student":
                record["ema_beta"] = self.ema.update(self.student)
                self.student_steps += 1
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        lr_used = trained.lr
        for tm in self.trained.values():  # set the lr of the next iteration
            tm.scheduler.step(1)
        elapsed = time.perf_counter() - t0
        losses = {k: v for k, v in totals.items() if k.startswith("loss")}
        if not stepped:
            losses = non_finite_losses(losses, totals)
        record.update(losses)
        record["loss"] = sum(losses.values()) if stepped else float("nan")
        record.update({k: v for k, v in totals.items() if not k.startswith("loss")})
        flops = phase_flops(self.model_cfg, self.tokens, self.dataset.text_len, "teacher" if not distill else ph,
                            self.rcm.rollout_max_steps, self.rcm.rollout_random_steps)["total"] * ctx.global_batch
        record.update({"grad_norm": float(grad_norm), "lr": lr_used,
                       "samples_per_sec": ctx.global_batch / max(elapsed, 1e-9),
                       "skipped_steps": self.skipped_steps, "consecutive_skipped_steps": self.consecutive_skips,
                       "student_steps": self.student_steps})
        record.update(throughput_metrics(flops, elapsed, ctx.world_size, tokens=self.tokens * ctx.global_batch))
        if self.device.type == "cuda":
            record.update(memory_metrics(self.device, reset=True))
        record.update(self.batches.metrics())
        if self.train.log_images_interval and (it + 1) % self.train.log_images_interval == 0 and first is not None:
            net = sampling_net(self.student, self.trained["student"].net, self.pipe, self.par.micro_batch_size,
                               ctx.link)
            log_samples(self.logger, first, it + 1, net, self.rcm if distill else None, self.train.seed,
                        self._autocast)
        if self.videos is not None and distill and first is not None and self.videos.due(it + 1):
            net = sampling_net(self.student, self.trained["student"].net, self.pipe, self.par.micro_batch_size,
                               ctx.link)
            self.videos.log(self.logger, it + 1, first, net, self.teacher if self.pipe.size == 1 else None, self.rcm,
                            self._autocast)
        return record

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        self.build()
        start, last, saved_at = time.time(), {}, None
        self.stop = stop = StopRequests()
        try:
            with stop:
                while self.iteration < self.train.train_iters:
                    last = self._one_iteration(self.iteration)
                    self.iteration += 1
                    self.logger.log(last)
                    if self.checkpoints is not None:
                        self.checkpoints.finalize()
                    limit = self.train.max_consecutive_skipped_steps
                    if limit and self.consecutive_skips >= limit:
                        raise TrainingAborted(f"{self.consecutive_skips} consecutive steps had non-finite gradients "
                                              f"(--max-consecutive-skipped-steps {limit}); stopping at iteration "
                                              f"{self.iteration} without saving")
                    if self.train.save_interval and self.iteration % self.train.save_interval == 0:
                        self.save()
                        saved_at = self.iteration
                    timed_out = (self.train.exit_duration_in_mins is not None
                                 and time.time() - start > 60 * self.train.exit_duration_in_mins)
                    if self.ctx.agree(stop.signal is not None or timed_out):
                        reason = stop.signal or f"--exit-duration-in-mins {self.train.exit_duration_in_mins}"
                        if saved_at != self.iteration:
                            self.save()
                            saved_at = self.iteration
                        if self.rank == 0:
                            print(f"exiting at iteration {self.iteration} ({reason}); checkpoint saved", flush=True)
                        break
                if self.train.save and saved_at != self.iteration:
                    self.save()
                if self.checkpoints is not None:
                    self.checkpoints.finalize(blocking=True)
        finally:
            self.logger.close()
            self.batches.close()
            if self.lease is not None:
                self.lease.release()
        return last
