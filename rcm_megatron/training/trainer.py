"""The training loop: builds teacher, student and fake score, and runs the rCM schedule
(or flow-matching teacher pretraining) with logging, sharded checkpoints and exact resume.

Per iteration: the schedule names the trained model; every DP rank takes its slice of the
layout-independent global batch, accumulates gradients over micro-batches (losses are sums
over samples divided by the *global* batch size, so data-parallel gradients simply add),
reduces gradients over DP x CP, skips the step if they are non-finite, steps the optimizer
and, on student steps, the power EMA (each DP x CP rank keeps its size-balanced share of the
shadow tensors), then advances both learning-rate schedulers (``lr_schedule.py``). On GPU
``--use-distributed-optimizer`` hands gradient reduction and the optimizers to megatron-core
(``megatron_dp.py``); the CPU path has the same semantics.

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
over the pipeline so global rank 0 logs them. SIGTERM / SIGUSR1 (SLURM pre-emption) and
``--exit-duration-in-mins`` end the run after a save at an iteration boundary.
"""

from __future__ import annotations

import contextlib
import signal
import time

import torch
import torch.distributed as dist

from ..checkpointing import sharded_state as ss
from ..checkpointing.dist_io import load_sharded, read_common
from ..checkpointing.errors import CheckpointError
from ..checkpointing.lease import acquire_writer_lease
from ..checkpointing.loading import read_model_source
from ..checkpointing.preflight import check_output_dirs, checkpoint_bytes
from ..checkpointing.resume import resolve_resume, verified_resume
from ..checkpointing.save import CheckpointManager
from ..data import build_dataset, global_batch_indices, local_slice
from ..models import WanConfig, WanDiT
from ..parallel import state as pstate
from ..parallel.config import ParallelConfig
from ..parallel.initialize import initialize_distributed, rank as global_rank, world_size
from ..parallel.pipeline import PipelineLayout, StageLink, stage_layer_range
from ..parallel.sharding import load_full_state_dict
from ..parallel.tensor_parallel import validate_tp
from ..rcm import Batch, PowerEMA, RCMConfig, build_optimizer, critic_step, phase, sample, student_step
from ..rcm.ema import partition_names
from . import lr_schedule, pipeline_step
from .arguments import ArgumentError, TrainingConfig, check_data_against_model
from .flow_matching import flow_matching_loss
from .metrics import MetricsLogger
from .throughput import latent_grid, memory_metrics, num_tokens, phase_flops, throughput_metrics

CHECKPOINT_VERSION = 1


class TrainingAborted(RuntimeError):
    """A run that must stop without saving (e.g. too many consecutive non-finite steps)."""


def _mpu():
    from megatron.core import parallel_state as mpu

    return mpu


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
            self.dataset = self._open_dataset()
            validate_tp(model_cfg, par.tensor_model_parallel_size)
            if par.context_parallel_size > 1:
                from ..parallel.context_parallel import validate_cp

                validate_cp(model_cfg, par.tensor_model_parallel_size, par.context_parallel_size, par.cp_comm_type,
                            par.hierarchical_context_parallel_sizes)
        except (OSError, ValueError) as e:
            raise ArgumentError(str(e)) from e
        check_data_against_model(self.dataset, model_cfg, f"--data {train.data or 'synthetic'}")
        self._check_pipeline_layout()
        self.lease = self._claim_outputs()
        self.load_path = self._resolve_load()
        if self.load_path is not None:
            self._check_resume_compatible(read_common(self.load_path))

    # ------------------------------------------------------------------ setup
    def _check_pipeline_layout(self) -> None:
        pp = self.par.pipeline_model_parallel_size
        if pp == 1:
            return
        try:
            stage_layer_range(self.model_cfg.num_layers, pp, 0)
        except ValueError as e:
            raise ArgumentError(str(e)) from e

    def _open_dataset(self):
        from ..data.shards import ShardDataset, is_shard_spec

        if is_shard_spec(self.train.data):
            return ShardDataset(self.train.data)
        return build_dataset(self.train.data, self.model_cfg.in_channels, self.model_cfg.text_dim,
                             self.train.latent_shape, seed=self.train.seed)

    def _claim_outputs(self):
        """--save / --log-dir writable, --save with room for a checkpoint and this run its one writer."""
        fake = self.train.mode == "distill" and self.rcm.uses_fake_score
        try:
            check_output_dirs(self.train.save, self.train.log_dir,
                              checkpoint_bytes(self.model_cfg, models=2 + fake, trained=1 + fake))
            return acquire_writer_lease(self.train.save)
        except CheckpointError as e:
            raise ArgumentError(str(e)) from e

    def _resolve_load(self) -> str | None:
        try:
            return resolve_resume(self.train.load, self.train.save, self.train.auto_resume)
        except CheckpointError as e:
            raise ArgumentError(str(e)) from e

    def _verified_load_path(self) -> str:
        """The resume checkpoint once its checksums verify (every rank; --auto-resume: falls back)."""
        try:
            path = verified_resume(self.load_path, fallback=self.train.auto_resume)
        except CheckpointError as e:
            raise ArgumentError(str(e)) from e
        if path != self.load_path:
            self._check_resume_compatible(read_common(path))
            self.load_path = path
        return path

    def _check_resume_compatible(self, common: dict) -> None:
        meta = common.get("meta", {})
        where = self.load_path
        if meta.get("format") != "rcm-megatron-train" or meta.get("version") != CHECKPOINT_VERSION:
            raise ArgumentError(f"--load {where}: not an rcm-megatron training checkpoint (version {CHECKPOINT_VERSION})")
        want, got = self.model_cfg.to_dict(), meta.get("model_config") or {}
        if got != want:
            diff = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
            raise ArgumentError(f"--load {where}: checkpoint is for another architecture (differs in {diff}: "
                                f"{ {k: got.get(k) for k in diff} } vs this run's { {k: want.get(k) for k in diff} })")
        method = self.rcm.mode if self.train.mode == "distill" else None
        if meta.get("mode") != self.train.mode or meta.get("method") != method:
            raise ArgumentError(f"--load {where}: checkpoint was written by --mode {meta.get('mode')} "
                                f"--method {meta.get('method')}, this run is --mode {self.train.mode} --method {method}")
        lr_student, lr_fake = self._peak_lrs(self.train.mode == "distill")
        for name, peak in (("student", lr_student), ("fake_score", lr_fake)):
            saved = (meta.get("lr_schedulers") or {}).get(name)
            if peak is None or saved is None:
                continue
            current = lr_schedule.schedule_fields(self.train.lr_schedule, max_lr=peak, scale=peak / lr_student,
                                                  train_iters=self.train.train_iters)
            try:
                lr_schedule.check_resume(saved, current, self.train.lr_schedule, f"--load {where} ({name})")
            except ValueError as e:
                raise ArgumentError(str(e)) from e
        self.resume_meta = meta

    def _new_model(self, trainable: bool) -> WanDiT:
        """This rank's pipeline stage of a model (the whole model at PP = 1)."""
        pipe = self.pipe
        m = WanDiT(self.model_cfg, pre_process=pipe.is_first, post_process=pipe.is_last,
                   layer_range=stage_layer_range(self.model_cfg.num_layers, pipe.size, pipe.rank))
        m.reset_parameters(seed=self.train.seed)
        if self.teacher_weights is not None:
            load_full_state_dict(m, self.teacher_weights)
        m.requires_grad_(trainable)
        return m

    def build(self) -> None:
        initialize_distributed(self.par)
        mpu = _mpu()
        self.rank = global_rank()
        self.dp_rank, self.dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
        self.dp_group = mpu.get_data_parallel_group()
        grad_group = mpu.get_data_parallel_group(with_context_parallel=True)
        self.grad_group = grad_group if dist.get_world_size(grad_group) > 1 else None
        self.global_batch, self.num_micro = self.par.resolve_batch(world_size())
        distill = self.train.mode == "distill"
        dev = self.device
        self.pipe = PipelineLayout.current()
        self.link = StageLink(self.pipe, dev)
        self.teacher = None
        if distill:
            self.teacher = self._new_model(trainable=False).to(dev).eval()
            if self.train.bf16:
                self.teacher.to_dtype(torch.bfloat16)
            if self.train.fp8_teacher:
                self.teacher.quantize_fp8()
        self.student = self._new_model(trainable=True).to(dev)  # in --mode teacher: the model being pretrained
        self.fake = self._new_model(trainable=True).to(dev) if distill and self.rcm.uses_fake_score else None
        for m in (self.student, self.fake):
            if m is not None:
                m.set_activation_recompute(self.train.recompute)
        if self.train.compile_blocks:
            for m in (self.teacher, self.student, self.fake):
                if m is not None:
                    m.compile_blocks()
        if distill:
            self.opt_student = build_optimizer(self.student.parameters(), self.rcm, "student")
        else:
            self.opt_student = torch.optim.AdamW(self.student.parameters(), lr=self.train.teacher_lr,
                                                 betas=(0.9, 0.99), weight_decay=self.rcm.weight_decay)
        self.opt_fake = build_optimizer(self.fake.parameters(), self.rcm, "fake_score") if self.fake else None
        self.student_dp = self.fake_dp = None
        if self.train.use_distributed_optimizer:
            self._wrap_megatron_data_parallel(distill)
        self.student_net = self.student_dp.net if self.student_dp else self.student
        self.fake_net = self.fake_dp.net if self.fake_dp else self.fake
        self._build_schedulers(distill)
        self.ema = PowerEMA(self.student, self.rcm.ema_sigma_rel, names=self._ema_names(grad_group))
        self.uncond = self.dataset.negative_context.unsqueeze(0).to(dev)
        self.loader = None
        from ..data.shards import ShardDataset, ShardLoader

        if isinstance(self.dataset, ShardDataset):
            self.loader = ShardLoader(self.dataset, self.dp_rank, self.dp_size, self.par.micro_batch_size,
                                      self.train.seed, global_batch_size=self.global_batch)
        self.iteration, self.student_steps, self.skipped_steps, self.consecutive_skips = 0, 0, 0, 0
        self.checkpoints = CheckpointManager(self.train.save, self.train.keep_last) if self.train.save else None
        if self.load_path is not None:
            self._load(self._verified_load_path())
        if self.loader is not None:
            self.loader.set_iteration(self.iteration)
        self.logger = MetricsLogger(self.train.log_dir, self.train.log_interval, enabled=self.rank == 0,
                                    resume_iteration=self.iteration)
        c, t, h, w = self.dataset.latent_shape
        self.tokens = num_tokens(self.model_cfg, (c, t, h, w))

    def _ema_names(self, group) -> list[str]:
        """The student parameters whose EMA this rank keeps: a size-balanced share over DP x CP."""
        sizes = {n: p.numel() for n, p in self.student.named_parameters()}
        return partition_names(sizes, dist.get_world_size(group))[dist.get_rank(group)]

    def _peak_lrs(self, distill: bool) -> tuple[float, float | None]:
        if not distill:
            return self.train.teacher_lr, None
        return self.rcm.lr_student, (self.rcm.lr_fake_score if self.rcm.uses_fake_score else None)

    def _build_schedulers(self, distill: bool) -> None:
        """One megatron-core lr scheduler per optimizer (lr_schedule.py); sets the step-0 lr."""
        lr_student, lr_fake = self._peak_lrs(distill)
        kw = dict(weight_decay=self.rcm.weight_decay, train_iters=self.train.train_iters)
        opt = self.student_dp.optimizer if self.student_dp else self.opt_student
        self.sched_student = lr_schedule.build_scheduler(opt, self.train.lr_schedule, max_lr=lr_student, scale=1.0,
                                                         **kw)
        self.sched_fake = None
        if lr_fake is not None:
            opt = self.fake_dp.optimizer if self.fake_dp else self.opt_fake
            self.sched_fake = lr_schedule.build_scheduler(opt, self.train.lr_schedule, max_lr=lr_fake,
                                                          scale=lr_fake / lr_student, **kw)

    def _schedulers(self) -> dict:
        return {k: v for k, v in (("student", self.sched_student), ("fake_score", self.sched_fake)) if v is not None}

    def _wrap_megatron_data_parallel(self, distill: bool) -> None:
        """GPU: megatron-core DDP + distributed optimizer replace the plain AdamW path."""
        from .megatron_dp import MegatronDP

        if self.train.bf16:
            self.student.to_dtype(torch.bfloat16)
            if self.fake is not None:
                self.fake.to_dtype(torch.bfloat16)
        min_lr = self.train.lr_schedule.min_lr
        lr_student, lr_fake = self._peak_lrs(distill)
        kw = dict(eps=self.rcm.adam_eps, weight_decay=self.rcm.weight_decay, clip_grad=self.rcm.grad_clip_norm,
                  pipeline_first_stage=self.pipe.is_first, bf16=self.train.bf16,
                  overlap_grad_reduce=self.train.overlap_grad_reduce,
                  overlap_param_gather=self.train.overlap_param_gather, cpu_offload=self.train.optimizer_cpu_offload)
        self.student_dp = MegatronDP(self.student, self.model_cfg, self.par, lr=lr_student, min_lr=min_lr,
                                     betas=self.rcm.adam_betas if distill else (0.9, 0.99), **kw)
        if self.fake is not None:
            self.fake_dp = MegatronDP(self.fake, self.model_cfg, self.par, lr=lr_fake,
                                      min_lr=min_lr * lr_fake / lr_student, betas=self.rcm.adam_betas, **kw)
        self.opt_student = self.opt_fake = None

    # ------------------------------------------------------------------ checkpoint state
    def _meta(self) -> dict:
        return {"format": "rcm-megatron-train", "version": CHECKPOINT_VERSION, "iteration": self.iteration,
                "student_steps": self.student_steps, "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips, "mode": self.train.mode,
                "method": self.rcm.mode if self.train.mode == "distill" else None,
                "model_config": self.model_cfg.to_dict(), "rcm_config": self.rcm.to_dict(),
                "teacher": self.teacher_meta, "world_size": world_size(),
                "optimizer_format": "megatron-distributed" if self.student_dp else "torch-adamw",
                "lr_schedulers": {k: v.state_dict() for k, v in self._schedulers().items()},
                "layout": {"tp": self.par.tensor_model_parallel_size, "cp": self.par.context_parallel_size,
                           "pp": self.par.pipeline_model_parallel_size, "dp": self.dp_size},
                "data_position": {"iteration": self.iteration, "global_batch": self.global_batch,
                                  "seed": self.train.seed,
                                  "loader": self.loader.state_dict() if self.loader is not None else None}}

    def _optimizer_sharded(self, model, opt, dp, prefix: str, is_loading: bool):
        if dp is not None:
            return dp.sharded_state_dict(ss.model_sharded_state_dict(model, prefix), is_loading=is_loading)
        sd = ss.optimizer_sharded_state_dict(opt, model, f"opt_{prefix}")
        if self.pipe.size > 1:
            # Step counts are common state, which every rank must hold alike (rank 0 writes it):
            # every stage contributes its parameters' counts.
            parts = [None] * self.pipe.size
            dist.all_gather_object(parts, sd["steps"], group=self.pipe.group)
            sd["steps"] = {name: step for part in parts for name, step in part.items()}
        return sd

    def sharded_state_dict(self, with_rng: bool = True, is_loading: bool = False) -> dict:
        sd = {"meta": self._meta(),
              "student": ss.model_sharded_state_dict(self.student, "student"),
              "ema": ss.tensors_sharded_state_dict(self.ema.shadow, self.student, "ema", dp_sharded=True),
              "ema_meta": {"sigma_rel": self.ema.sigma_rel, "num_updates": self.ema.num_updates},
              "opt_student": self._optimizer_sharded(self.student, self.opt_student, self.student_dp, "student",
                                                     is_loading)}
        if self.fake is not None:
            sd["fake_score"] = ss.model_sharded_state_dict(self.fake, "fake_score")
            sd["opt_fake_score"] = self._optimizer_sharded(self.fake, self.opt_fake, self.fake_dp, "fake_score",
                                                           is_loading)
        if with_rng:
            sd["rng"] = ss.rng_sharded_object("rng", {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        return sd

    def _load(self, path: str) -> None:
        meta = self.resume_meta
        same_world = meta.get("world_size") == world_size()
        fmt = "megatron-distributed" if self.student_dp else "torch-adamw"
        if meta.get("optimizer_format", "torch-adamw") != fmt:
            raise ArgumentError(f"--load {path}: optimizer state was saved as {meta.get('optimizer_format')}, this "
                                f"run uses {fmt} (--use-distributed-optimizer must match the saving run)")
        loaded = load_sharded(path, self.sharded_state_dict(with_rng=same_world, is_loading=True))
        ss.copy_loaded_into_model(self.student, loaded["student"])
        for name, t in loaded["ema"].items():
            if t.data_ptr() != self.ema.shadow[name].data_ptr():
                self.ema.shadow[name].copy_(t)
        self.ema.num_updates = int(loaded["ema_meta"]["num_updates"])
        if self.student_dp is not None:
            self.student_dp.load_state_dict(loaded["opt_student"])
        else:
            ss.load_optimizer_state(self.opt_student, self.student, loaded["opt_student"])
        if self.fake is not None:
            ss.copy_loaded_into_model(self.fake, loaded["fake_score"])
            if self.fake_dp is not None:
                self.fake_dp.load_state_dict(loaded["opt_fake_score"])
            else:
                ss.load_optimizer_state(self.opt_fake, self.fake, loaded["opt_fake_score"])
        # After the optimizers (their saved param groups carry an lr): the schedulers set it last.
        for name, sched in self._schedulers().items():  # compatibility checked in _check_resume_compatible
            saved = meta.get("lr_schedulers", {}).get(name)
            if saved is None:  # written before schedulers were saved: constant lr, the old behaviour
                sched.step(int(meta["iteration"]))
            else:
                sched.load_state_dict(saved)
        if same_world and loaded.get("rng") is not None:
            torch.set_rng_state(loaded["rng"]["torch"])
        self.iteration, self.student_steps = int(meta["iteration"]), int(meta["student_steps"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.consecutive_skips = int(meta.get("consecutive_skips", 0))
        pos = meta.get("data_position", {})
        if pos.get("global_batch") != self.global_batch or pos.get("seed") != self.train.seed:
            raise ArgumentError(f"--load {path}: checkpoint used global batch {pos.get('global_batch')} and seed "
                                f"{pos.get('seed')}, this run {self.global_batch} and {self.train.seed}; the data "
                                "position would not resume exactly")
        if self.loader is not None and pos.get("loader") is not None:
            self.loader.load_state_dict(pos["loader"])
        if self.rank == 0:
            print(f"resumed from {path} at iteration {self.iteration}", flush=True)

    def save(self) -> None:
        if self.checkpoints is not None:
            # the last checkpoint before a run of skipped steps is kept through --keep-last rotation
            protected = [self.checkpoints.newest_at_or_before(self.iteration - self.consecutive_skips)] \
                if self.consecutive_skips else []
            try:
                self.checkpoints.save(self.iteration, self.sharded_state_dict(), protected)
            except CheckpointError as e:
                raise TrainingAborted(str(e)) from e
            if self.rank == 0:
                print(f"saved checkpoint at iteration {self.iteration} to {self.train.save}", flush=True)

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        if not self.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _micro_batches(self, it: int):
        if self.loader is not None:
            raws = (self.loader.next_batch() for _ in range(self.num_micro))
        else:
            idx = global_batch_indices(self.train.seed, it, self.global_batch, len(self.dataset))
            local = local_slice(idx, self.dp_rank, self.dp_size)
            mbs = self.par.micro_batch_size
            raws = (self.dataset.batch(local[k * mbs:(k + 1) * mbs]) for k in range(self.num_micro))
        for raw in raws:
            yield Batch(x0=raw["latents"].to(self.device), context=raw["context"].to(self.device),
                        uncond_context=self.uncond, indices=raw["index"])

    def _pipelined_step(self, ph, batches, it: int) -> dict:
        kw = dict(loss_normalizer=self.global_batch)
        if self.train.mode != "distill":
            return pipeline_step.flow_matching_step(self.student, batches, self.train.seed, it, self.link, **kw)
        if ph.is_student:
            return pipeline_step.student_step(self.rcm, self.teacher, self.student, self.fake, batches, it, self.link,
                                              phase=ph, **kw)
        return pipeline_step.critic_step(self.rcm, self.student, self.fake, batches, it, self.link, **kw)

    def _reduce_totals(self, totals: dict) -> dict:
        """Sum over DP ranks; under PP every stage takes the last stage's values (only it has the losses)."""
        if self.dp_size == 1 and self.pipe.size == 1:
            return totals
        keys = sorted(totals)
        buf = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self._comm_device())
        if self.dp_size > 1:
            dist.all_reduce(buf, group=self.dp_group)
        self.pipe.broadcast_from_last(buf)
        return dict(zip(keys, buf.cpu().tolist()))

    def _reduce_and_norm(self, model) -> torch.Tensor:
        """Reduce gradients over DP x CP (and the time embedding's over PP); the global norm,
        every parameter counted once: TP shards summed over TP, pipeline-replicated parameters
        on the first stage only, squares summed over the stages."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for _, p in named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.grad_group is not None:
                dist.all_reduce(p.grad, group=self.grad_group)
        pipeline_step.all_reduce_replicated_grads(model, self.pipe)
        params = [p for n, p in named if self.pipe.is_first or not pipeline_step.is_pipeline_replicated(n)]
        sharded = sum((p.grad.detach().float().pow(2).sum() for p in params
                       if getattr(p, "tp_split_dim", None) is not None), torch.zeros(()))
        rest = sum((p.grad.detach().float().pow(2).sum() for p in params
                    if getattr(p, "tp_split_dim", None) is None), torch.zeros(()))
        tp_group = pstate.tensor_parallel_group()
        if tp_group is not None and dist.get_world_size(tp_group) > 1:  # other shards' squares; replicated once
            sharded = sharded.to(self.device)
            dist.all_reduce(sharded, group=tp_group)
        total = sharded.cpu() + rest.cpu()
        if self.pipe.size > 1:
            total = self.pipe.all_reduce(total.to(self._comm_device())).cpu()
        return total.sqrt()

    def _clip_gradients(self, model, grad_norm: torch.Tensor) -> None:
        """Clip to --clip-grad by the *global* norm (over TP, PP and DP, as computed above), so
        every rank scales its shards alike; torch's clip_grad_norm_ formula."""
        max_norm = self.rcm.grad_clip_norm
        if max_norm is None:
            return
        coef = min(1.0, max_norm / (float(grad_norm) + 1e-6))
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    def _one_iteration(self, it: int) -> dict:
        distill = self.train.mode == "distill"
        ph = phase(self.rcm, it) if distill else None
        trained = self.student if (not distill or ph.is_student) else self.fake
        opt = self.opt_student if trained is self.student else self.opt_fake
        dp = self.student_dp if trained is self.student else self.fake_dp
        if dp is not None:
            dp.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        t0 = time.perf_counter()
        first = None
        if self.pipe.size > 1:
            batches = list(self._micro_batches(it))
            first = batches[0]
            with self._autocast(), (dp.accumulate() if dp is not None else contextlib.nullcontext()):
                out = self._pipelined_step(ph, batches, it)
            for k, v in out.items():  # diagnostics are means over this DP rank's batch already
                totals[k] = float(v) * (1.0 if k.startswith("loss") else 1.0 / self.dp_size)
        else:
            for batch in self._micro_batches(it):
                first = batch if first is None else first
                with self._autocast(), (dp.accumulate() if dp is not None else contextlib.nullcontext()):
                    if not distill:
                        loss, _ = flow_matching_loss(self.student_net, batch.x0, batch.context, batch.uncond_context,
                                                     batch.indices, self.train.seed, it)
                        loss = loss / self.global_batch
                        loss.backward()
                        out = {"loss_flow_matching": loss.detach()}
                    elif ph.is_student:
                        out = student_step(self.rcm, self.teacher, self.student_net, self.fake_net, batch, it,
                                           loss_normalizer=self.global_batch, phase=ph)
                    else:
                        out = critic_step(self.rcm, self.student_net, self.fake_net, batch, it,
                                          loss_normalizer=self.global_batch)
                for k, v in out.items():
                    w = 1.0 if k.startswith("loss") else 1.0 / (self.num_micro * self.dp_size)
                    totals[k] = totals.get(k, 0.0) + float(v) * w
        totals = self._reduce_totals(totals)
        record = {"iteration": it + 1, "phase": "teacher" if not distill else ph.model}
        if dp is not None:
            stepped, grad_norm = dp.step()
            grad_norm = torch.tensor(grad_norm)
        else:
            grad_norm = self._reduce_and_norm(trained)
            stepped = bool(torch.isfinite(grad_norm))
            if stepped:
                if distill:
                    self._clip_gradients(trained, grad_norm)
                opt.step()
        if stepped:
            self.consecutive_skips = 0
            if trained is self.student:
                record["ema_beta"] = self.ema.update(self.student)
                self.student_steps += 1
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if dp is not None:
                dp.zero_grad()
            else:
                opt.zero_grad(set_to_none=True)
        lr_used = dp.lr if dp is not None else opt.param_groups[0]["lr"]
        for sched in self._schedulers().values():  # set the lr of the next iteration
            sched.step(1)
        elapsed = time.perf_counter() - t0
        losses = {k: v for k, v in totals.items() if k.startswith("loss")}
        record.update(losses)
        record["loss"] = sum(losses.values())
        record.update({k: v for k, v in totals.items() if not k.startswith("loss")})
        flops = phase_flops(self.model_cfg, self.tokens, self.dataset.text_len,
                            "teacher" if not distill else ph, self.rcm.rollout_max_steps,
                            self.rcm.rollout_random_steps)["total"] * self.global_batch
        record.update({"grad_norm": float(grad_norm), "lr": lr_used,
                       "samples_per_sec": self.global_batch / max(elapsed, 1e-9),
                       "skipped_steps": self.skipped_steps, "student_steps": self.student_steps})
        record.update(throughput_metrics(flops, elapsed, world_size(), tokens=self.tokens * self.global_batch))
        if self.device.type == "cuda":
            record.update(memory_metrics(self.device, reset=True))
        if self.loader is not None:
            record["bad_samples"] = self.loader.bad_samples
        if self.train.log_images_interval and (it + 1) % self.train.log_images_interval == 0 and first is not None:
            self._log_samples(first, it + 1)
        return record

    @torch.no_grad()
    def _log_samples(self, batch: Batch, iteration: int) -> None:
        """TensorBoard grids: the data, and few-step samples of the student (EMA weights are
        evaluated by tools/evaluate.py; here the live student shows training progress)."""
        n = min(4, batch.x0.shape[0])
        self.logger.add_image("samples/data", latent_grid(batch.x0[:n].float().cpu()), iteration)
        if self.train.mode != "distill":
            return
        with self._autocast():
            for steps in sorted({1, min(4, self.rcm.rollout_max_steps)}):
                x = sample(self._sampling_net(), batch.context[:n], batch.latent_shape, batch.indices[:n],
                           seed=self.train.seed, num_steps=steps, mid_times=self.rcm.sample_mid_times,
                           sigma_max=self.rcm.sample_sigma_max, stream="tensorboard")
                self.logger.add_image(f"samples/student_{steps}step", latent_grid(x.float().cpu()), iteration)

    def _sampling_net(self):
        if self.pipe.size > 1:  # every stage takes part in each step's forward sweep
            return pipeline_step.PipelinedNet(self.student, self.par.micro_batch_size, self.link)
        return self.student_net

    def _comm_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _agree(self, flag: bool) -> bool:
        """All ranks take the same decision (any rank's flag)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def run(self) -> dict:
        self.build()
        stop = {"signal": None}

        def on_signal(signum, _frame):
            stop["signal"] = signal.Signals(signum).name

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        start, last, saved_at = time.time(), {}, None
        try:
            while self.iteration < self.train.train_iters:
                last = self._one_iteration(self.iteration)
                self.iteration += 1
                self.logger.log(last)
                if self.checkpoints is not None:
                    self.checkpoints.finalize()
                if self.train.max_consecutive_skipped_steps and \
                        self.consecutive_skips >= self.train.max_consecutive_skipped_steps:
                    raise TrainingAborted(f"{self.consecutive_skips} consecutive steps had non-finite gradients "
                                          f"(--max-consecutive-skipped-steps {self.train.max_consecutive_skipped_steps});"
                                          f" stopping at iteration {self.iteration} without saving")
                if self.train.save_interval and self.iteration % self.train.save_interval == 0:
                    self.save()
                    saved_at = self.iteration
                timed_out = (self.train.exit_duration_in_mins is not None
                             and time.time() - start > 60 * self.train.exit_duration_in_mins)
                if self._agree(stop["signal"] is not None or timed_out):
                    reason = stop["signal"] or f"--exit-duration-in-mins {self.train.exit_duration_in_mins}"
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
            for s, h in old.items():
                signal.signal(s, h)
            self.logger.close()
            if self.loader is not None:
                self.loader.close()
            if self.lease is not None:
                self.lease.release()
        return last
