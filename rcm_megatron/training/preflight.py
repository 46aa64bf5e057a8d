"""What is checked before a run starts (distributed init, any model, any checkpoint write):
the teacher file, the data against the architecture, the parallel layout against the
architecture, the checkpoint to resume from against this run, and the host memory of a CPU
run. Every failure is an ``ArgumentError``: one line naming the flag, file or shape, exit 2."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from ..checkpointing.errors import CheckpointError
from ..checkpointing.expert_source import EXPERTS_FILE, check_resume_init, is_expert_checkpoint, read_expert_source
from ..checkpointing.lease import acquire_writer_lease
from ..checkpointing.loading import read_model_source
from ..checkpointing.preflight import check_output_dirs, checkpoint_bytes
from ..models import WanConfig
from ..models.config import PRESETS, preset
from ..parallel.config import ParallelConfig
from ..planning.search import check_fits, check_host_memory
from ..parallel.pipeline import stage_layer_range
from ..parallel.tensor_parallel import validate_tp
from ..rcm import RCMConfig
from . import train_state
from .arguments import ArgumentError, TrainingConfig
from .batches import check_data_against_model, open_dataset
from .model_building import peak_lrs
from .trained_model import backend_name


@dataclass
class Preflight:
    model_cfg: WanConfig
    dataset: object
    teacher_weights: dict | None
    teacher_meta: dict
    load_path: str | None  # the committed checkpoint to resume from
    resume_meta: dict | None
    lease: object | None  # this run's writer lease on --save (checkpointing.lease)
    expert_teacher: object | None = None  # ExpertTeacherSource of a two-expert --teacher-checkpoint


def model_cfg_name(cfg: WanConfig) -> str:
    """The preset's name of an architecture (for messages), else 'custom'."""
    return next((name for name in sorted(PRESETS) if preset(name) == cfg), "custom")


def preflight(train: TrainingConfig, model_cfg: WanConfig | None, rcm_cfg: RCMConfig, par: ParallelConfig) -> Preflight:
    """``model_cfg`` None: the architecture comes from --teacher-checkpoint."""
    teacher_weights, teacher_meta = None, {"source": "random-init", "seed": train.seed}
    experts = None
    if train.teacher_checkpoint and is_expert_checkpoint(train.teacher_checkpoint):
        check_expert_layout(train, par)
        try:
            experts = read_expert_source(train.teacher_checkpoint, train.expert_init)
        except (OSError, ValueError, KeyError) as e:
            raise ArgumentError(f"--teacher-checkpoint {train.teacher_checkpoint}: {e}") from e
        model_cfg, teacher_weights, teacher_meta = experts.config, experts.weights, experts.provenance
    elif train.expert_init != "low_noise":
        raise ArgumentError(f"--expert-init {train.expert_init} needs a two-expert --teacher-checkpoint "
                            f"(a folder with {EXPERTS_FILE}), got {train.teacher_checkpoint or 'none'}")
    if train.teacher_checkpoint and experts is None:
        try:
            model_cfg, teacher_weights, teacher_meta = read_model_source(train.teacher_checkpoint)
        except (OSError, ValueError, KeyError) as e:
            raise ArgumentError(f"--teacher-checkpoint {train.teacher_checkpoint}: {e}") from e
    if train.teacher_checkpoint and train.model is not None and preset(train.model) != model_cfg:
        want, got = preset(train.model).to_dict(), model_cfg.to_dict()
        diff = {k: got[k] for k in want if want[k] != got[k]}
        raise ArgumentError(f"--model {train.model} does not match --teacher-checkpoint "
                            f"{train.teacher_checkpoint}, whose architecture has {diff} (--model "
                            f"{model_cfg_name(model_cfg)}); the architecture comes from the checkpoint: drop "
                            "--model or name the matching preset")
    try:
        dataset = open_dataset(train, model_cfg)
        validate_tp(model_cfg, par.tensor_model_parallel_size)
        if par.context_parallel_size > 1:
            from ..parallel.context_parallel import validate_cp

            validate_cp(model_cfg, par.tensor_model_parallel_size, par.context_parallel_size, par.cp_comm_type,
                        par.hierarchical_context_parallel_sizes)
        if par.pipeline_model_parallel_size > 1:
            stage_layer_range(model_cfg.num_layers, par.pipeline_model_parallel_size, 0)
    except (OSError, ValueError) as e:
        raise ArgumentError(str(e)) from e
    check_data_against_model(dataset, model_cfg, f"--data {train.data or 'synthetic'}")
    lease = claim_outputs(train, model_cfg, rcm_cfg)  # before reading --save: another writer may be at work
    load_path, resume_meta = train_state.resolve_load(train), None
    if load_path is not None:
        resume_meta = train_state.check_resume_compatible(load_path, train, rcm_cfg, model_cfg,
                                                          peak_lrs(train, rcm_cfg))
        if experts is not None and (line := check_resume_init(resume_meta.get("teacher"), train.expert_init)):
            raise ArgumentError(f"--load {load_path}: {line}")
    if train.memory_check and train.device.startswith("cuda"):  # the last checks: the models are built next
        line = check_fits(data_plan_flags(train, rcm_cfg, par, dataset, experts), model_cfg)
        if line:
            raise ArgumentError(line)
    if train.memory_check and train.device == "cpu":
        source = f"--teacher-checkpoint {train.teacher_checkpoint}" if train.teacher_checkpoint else \
            f"--model {model_cfg_name(model_cfg)}"
        line = check_host_memory(data_plan_flags(train, rcm_cfg, par, dataset, experts), model_cfg, source)
        if line:
            raise ArgumentError(line)
    return Preflight(model_cfg, dataset, teacher_weights, teacher_meta, load_path, resume_meta, lease, experts)


def check_expert_layout(train: TrainingConfig, par: ParallelConfig) -> None:
    """A two-expert teacher routes each sample to one expert, so ranks holding different samples run
    different experts: that rules out layouts whose collectives span them (ZeRO-3's per-block gathers
    over DP, pipeline stages sending whole micro-batches), and --mode teacher has no teacher."""
    flag = ("--mode teacher" if train.mode != "distill" else "--use-torch-fsdp2" if train.use_torch_fsdp2
            else "--pipeline-model-parallel-size > 1" if par.pipeline_model_parallel_size > 1 else None)
    if flag is not None:
        raise ArgumentError(f"--teacher-checkpoint {train.teacher_checkpoint} is a two-expert teacher "
                            f"(experts.json), which {flag} does not support; drop {flag.split()[0]}")


def plan_flags(train: TrainingConfig, rcm_cfg: RCMConfig, par: ParallelConfig) -> SimpleNamespace:
    """This run's settings under pretrain_rcm's flag names, as the memory planner reads them."""
    return SimpleNamespace(
        tensor_model_parallel_size=par.tensor_model_parallel_size, context_parallel_size=par.context_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size, sequence_parallel=par.sequence_parallel,
        cp_comm_type=par.cp_comm_type, micro_batch_size=par.micro_batch_size, global_batch_size=par.global_batch_size,
        latent_shape=train.latent_shape, bf16=train.bf16, method=rcm_cfg.method, mode=train.mode,
        rollout_max_steps=rcm_cfg.rollout_max_steps, student_update_freq=rcm_cfg.student_update_freq,
        use_distributed_optimizer=train.use_distributed_optimizer, use_torch_fsdp2=train.use_torch_fsdp2,
        optimizer_cpu_offload=train.optimizer_cpu_offload,
        recompute_granularity=train.recompute.granularity, recompute_num_layers=train.recompute.num_layers,
        device=train.device, compile_blocks=train.compile_blocks, fp8_teacher=train.fp8_teacher,
        first_last_layers_bf16=train.first_last_layers_bf16)


def data_plan_flags(train: TrainingConfig, rcm_cfg: RCMConfig, par: ParallelConfig, dataset,
                    experts=None) -> SimpleNamespace:
    """``plan_flags`` at the shape of the samples trained on: the dataset's latent shape and text
    length (for shards, their metadata), not --latent-shape's default of 480p; with a two-expert
    teacher (``experts``), both experts' weights."""
    flags = plan_flags(train, rcm_cfg, par)
    flags.latent_shape, flags.text_len = tuple(dataset.latent_shape), dataset.text_len
    flags.teacher_experts = 1 if experts is None else 2
    return flags


def claim_outputs(train: TrainingConfig, model_cfg: WanConfig, rcm_cfg: RCMConfig):
    """--save / --log-dir writable, --save with room for one checkpoint, and this run its one writer
    (the lease; None without --save). The first write of the run, after every check."""
    fake = train.mode == "distill" and rcm_cfg.uses_fake_score
    try:
        size = checkpoint_bytes(model_cfg, backend_name(train.use_distributed_optimizer, train.use_torch_fsdp2),
                                train.bf16, fake)
        check_output_dirs(train.save, train.log_dir, size)
        return acquire_writer_lease(train.save)
    except CheckpointError as e:
        raise ArgumentError(str(e)) from e
