"""The training loop: builds teacher, student and fake score, and runs the rCM schedule
(or flow-matching teacher pretraining) with logging, checkpoints and exact resume.

Per iteration: the schedule names the trained model; every DP rank takes its slice of the
layout-independent global batch, accumulates gradients over micro-batches (losses are sums
over samples divided by the *global* batch size, so data-parallel gradients simply add),
reduces gradients, skips the step if they are non-finite, steps the optimizer and, on
student steps, the power EMA.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time

import torch
import torch.distributed as dist

from ..convert.sources import read_model_source
from ..data import build_dataset, global_batch_indices, local_slice
from ..models import WanConfig, WanDiT
from ..parallel import state as pstate
from ..parallel.config import ParallelConfig
from ..parallel.initialize import initialize_distributed, rank as global_rank, world_size
from ..rcm import Batch, PowerEMA, RCMConfig, build_optimizer, clip_gradients, critic_step, phase, student_step
from .arguments import ArgumentError, TrainingConfig, check_data_against_model
from .checkpoint import load_checkpoint, save_checkpoint
from .flow_matching import flow_matching_loss
from .metrics import MetricsLogger


def _data_parallel_info():
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, None
    from megatron.core import parallel_state as mpu

    group = mpu.get_data_parallel_group()
    return dist.get_rank(group), dist.get_world_size(group), group


def _grad_reduce_group():
    """Gradients of replicated data are summed over data- and context-parallel ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state as mpu

    group = mpu.get_data_parallel_group(with_context_parallel=True)
    return group if dist.get_world_size(group) > 1 else None


def load_full_state_dict(model: WanDiT, full: dict) -> None:
    """Load a full (unsharded) state dict into a possibly TP-sharded model, by ``tp_split_dim``."""
    tp, r = pstate.tensor_parallel_world_size(), pstate.tensor_parallel_rank()
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(full))
    if missing:
        raise KeyError(f"weights are missing parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    with torch.no_grad():
        for name, p in own.items():
            t = full[name]
            split = getattr(p, "tp_split_dim", None)
            if split is not None and tp > 1:
                t = t.chunk(tp, dim=split)[r]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"weight {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


class Trainer:
    def __init__(self, train: TrainingConfig, model_cfg: WanConfig | None, rcm_cfg: RCMConfig, par: ParallelConfig):
        self.train, self.rcm, self.par = train, rcm_cfg, par
        self.device = torch.device(train.device)
        # Everything that can fail on a user's input is checked before distributed init or allocation.
        self.teacher_weights, self.teacher_meta = None, {"source": "random-init", "seed": train.seed}
        if train.teacher_checkpoint:
            try:
                model_cfg, self.teacher_weights, self.teacher_meta = read_model_source(train.teacher_checkpoint)
            except (OSError, ValueError, KeyError) as e:
                raise ArgumentError(f"--teacher-checkpoint {train.teacher_checkpoint}: {e}") from e
        self.model_cfg = model_cfg
        try:
            self.dataset = build_dataset(train.data, model_cfg.in_channels, model_cfg.text_dim, train.latent_shape,
                                         seed=train.seed)
        except (OSError, ValueError) as e:
            raise ArgumentError(str(e)) from e
        check_data_against_model(self.dataset, model_cfg, f"--data {train.data or 'synthetic'}")
        tp = par.tensor_model_parallel_size
        for name, size in (("num_attention_heads", model_cfg.num_attention_heads),
                           ("ffn_hidden_size", model_cfg.ffn_hidden_size), ("hidden_size", model_cfg.hidden_size)):
            if size % tp:
                raise ArgumentError(f"--tensor-model-parallel-size {tp} does not divide the model's {name} ({size})")
        if train.save and par.model_parallel_size > 1:
            raise ArgumentError("--save with tensor/context/pipeline parallelism needs sharded checkpoints, "
                                "which this version does not write yet; save at model-parallel size 1")
        self.resume = None
        if train.load:
            try:
                self.resume = load_checkpoint(train.load)
            except (OSError, ValueError) as e:
                raise ArgumentError(str(e)) from e
            self._check_resume_compatible(self.resume)
        if train.mode == "teacher" and train.teacher_checkpoint is None and self.resume is None:
            pass  # pretraining a teacher from scratch

    # ------------------------------------------------------------------ setup
    def _check_resume_compatible(self, ckpt: dict) -> None:
        want = self.model_cfg.to_dict()
        got = ckpt.get("model_config")
        if got != want:
            diff = sorted(k for k in set(want) | set(got or {}) if (got or {}).get(k) != want.get(k))
            raise ArgumentError(f"--load {self.train.load}: checkpoint is for another architecture "
                                f"(differs in {diff})")
        if ckpt.get("mode") != self.train.mode or ckpt.get("method") != (self.rcm.mode if self.train.mode == "distill" else None):
            raise ArgumentError(f"--load {self.train.load}: checkpoint was written by --mode {ckpt.get('mode')} "
                                f"--method {ckpt.get('method')}, this run is --mode {self.train.mode} "
                                f"--method {self.rcm.mode}")

    def _new_model(self, trainable: bool) -> WanDiT:
        m = WanDiT(self.model_cfg)
        m.reset_parameters(seed=self.train.seed)
        if self.teacher_weights is not None:
            load_full_state_dict(m, self.teacher_weights)
        m.requires_grad_(trainable)
        return m

    def build(self) -> None:
        initialize_distributed(self.par)
        self.rank = global_rank()
        self.dp_rank, self.dp_size, self.dp_group = _data_parallel_info()
        self.global_batch, self.num_micro = self.par.resolve_batch(world_size())
        distill = self.train.mode == "distill"
        dev = self.device
        if distill:
            self.teacher = self._new_model(trainable=False).to(dev).eval()
            if self.train.bf16:
                self.teacher.to_dtype(torch.bfloat16)
            self.student = self._new_model(trainable=True).to(dev)
            self.fake = self._new_model(trainable=True).to(dev) if self.rcm.uses_fake_score else None
            self.opt_student = build_optimizer(self.student.parameters(), self.rcm, "student")
            self.opt_fake = build_optimizer(self.fake.parameters(), self.rcm, "fake_score") if self.fake else None
            self.ema = PowerEMA(self.student, self.rcm.ema_sigma_rel)
        else:
            self.teacher = None
            self.student = self._new_model(trainable=True).to(dev)  # the model being pretrained
            self.fake, self.opt_fake = None, None
            self.opt_student = torch.optim.AdamW(self.student.parameters(), lr=self.train.teacher_lr,
                                                 betas=(0.9, 0.99), weight_decay=self.rcm.weight_decay)
            self.ema = PowerEMA(self.student, self.rcm.ema_sigma_rel)
        self.uncond = self.dataset.negative_context.unsqueeze(0).to(dev)
        self.iteration, self.student_steps, self.skipped_steps = 0, 0, 0
        if self.resume is not None:
            self._load_state(self.resume)
            self.resume = None
        self.logger = MetricsLogger(self.train.log_dir, self.train.log_interval, enabled=self.rank == 0,
                                    resume_iteration=self.iteration)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format": "rcm-megatron-train", "iteration": self.iteration, "student_steps": self.student_steps,
            "skipped_steps": self.skipped_steps, "mode": self.train.mode,
            "method": self.rcm.mode if self.train.mode == "distill" else None,
            "model_config": self.model_cfg.to_dict(), "rcm_config": repr(self.rcm), "teacher": self.teacher_meta,
            "student": self.student.state_dict(), "ema": self.ema.state_dict(),
            "fake_score": self.fake.state_dict() if self.fake is not None else None,
            "opt_student": self.opt_student.state_dict(),
            "opt_fake_score": self.opt_fake.state_dict() if self.opt_fake is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "data_position": {"iteration": self.iteration, "global_batch": self.global_batch, "seed": self.train.seed},
        }

    def _load_state(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt_student.load_state_dict(ckpt["opt_student"])
        if self.fake is not None:
            self.fake.load_state_dict(ckpt["fake_score"])
            self.opt_fake.load_state_dict(ckpt["opt_fake_score"])
        self.iteration, self.student_steps = int(ckpt["iteration"]), int(ckpt["student_steps"])
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        torch.set_rng_state(ckpt["rng"]["torch"])
        pos = ckpt.get("data_position", {})
        if pos.get("global_batch", self.global_batch) != self.global_batch:
            raise ArgumentError(f"--load {self.train.load}: checkpoint used global batch {pos['global_batch']}, "
                                f"this run {self.global_batch}; the data position would not resume exactly")

    def save(self) -> None:
        if self.train.save and self.rank == 0:
            save_checkpoint(self.train.save, self.iteration, self.state_dict(), keep_last=self.train.keep_last)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        if not self.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _micro_batches(self, it: int):
        idx = global_batch_indices(self.train.seed, it, self.global_batch, len(self.dataset))
        local = local_slice(idx, self.dp_rank, self.dp_size)
        mbs = self.par.micro_batch_size
        for k in range(self.num_micro):
            chunk = local[k * mbs:(k + 1) * mbs]
            raw = self.dataset.batch(chunk)
            yield Batch(x0=raw["latents"].to(self.device), context=raw["context"].to(self.device),
                        uncond_context=self.uncond, indices=raw["index"])

    def _reduce_and_norm(self, model) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        group = _grad_reduce_group()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if group is not None:
                dist.all_reduce(p.grad, group=group)
        norm_sq = sum(p.grad.detach().float().pow(2).sum() for p in params)
        tp_group = pstate.tensor_parallel_group()
        if tp_group is not None:  # sharded parameters: add the other shards' squares (replicated ones counted once)
            sharded = sum(p.grad.detach().float().pow(2).sum() for p in params
                          if getattr(p, "tp_split_dim", None) is not None)
            rest = norm_sq - sharded
            dist.all_reduce(sharded, group=tp_group)
            norm_sq = sharded + rest
        return norm_sq.sqrt()

    def _one_iteration(self, it: int) -> dict:
        distill = self.train.mode == "distill"
        ph = phase(self.rcm, it) if distill else None
        trained = self.student if (not distill or ph.is_student) else self.fake
        opt = self.opt_student if trained is self.student else self.opt_fake
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        t0 = time.perf_counter()
        for batch in self._micro_batches(it):
            with self._autocast():
                if not distill:
                    loss, _ = flow_matching_loss(self.student, batch.x0, batch.context, batch.uncond_context,
                                                 batch.indices, self.train.seed, it)
                    loss = loss / self.global_batch
                    loss.backward()
                    out = {"loss_flow_matching": loss.detach()}
                elif ph.is_student:
                    out = student_step(self.rcm, self.teacher, self.student, self.fake, batch, it,
                                       loss_normalizer=self.global_batch, phase=ph)
                else:
                    out = critic_step(self.rcm, self.student, self.fake, batch, it, loss_normalizer=self.global_batch)
            for k, v in out.items():
                w = 1.0 if k.startswith("loss") else 1.0 / (self.num_micro * self.dp_size)
                totals[k] = totals.get(k, 0.0) + float(v) * w
        if self.dp_group is not None and self.dp_size > 1:
            keys = sorted(totals)
            buf = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(buf, group=self.dp_group)
            totals = dict(zip(keys, buf.tolist()))
        grad_norm = self._reduce_and_norm(trained)
        record = {"iteration": it + 1, "phase": "teacher" if not distill else ph.model}
        if torch.isfinite(grad_norm):
            clip_gradients(trained.parameters(), self.rcm) if distill else None
            opt.step()
            if trained is self.student:
                record["ema_beta"] = self.ema.update(self.student)
                self.student_steps += 1
        else:
            self.skipped_steps += 1
        elapsed = time.perf_counter() - t0
        losses = {k: v for k, v in totals.items() if k.startswith("loss")}
        record.update(losses)
        record["loss"] = sum(losses.values())
        record.update({k: v for k, v in totals.items() if not k.startswith("loss")})
        record.update({"grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                       "samples_per_sec": self.global_batch / max(elapsed, 1e-9),
                       "skipped_steps": self.skipped_steps, "student_steps": self.student_steps})
        return record

    def run(self) -> dict:
        self.build()
        last = {}
        while self.iteration < self.train.train_iters:
            last = self._one_iteration(self.iteration)
            self.iteration += 1
            self.logger.log(last)
            if self.train.save_interval and self.iteration % self.train.save_interval == 0:
                self.save()
        if self.train.save and not (self.train.save_interval and self.iteration % self.train.save_interval == 0):
            self.save()
        self.logger.close()
        return last
