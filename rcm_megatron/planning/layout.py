"""What a plan is about: the parallel layout and the workload, one validated dataclass each."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.config import WanConfig
from ..training.throughput import num_tokens

ZERO_LEVELS = (0, 1, 3)


@dataclass(frozen=True)
class Layout:
    """A parallel layout and memory options, by Megatron-LM flag (see ``flags``).

    zero: 0 = plain AdamW on every rank (fp32 parameters, bf16 autocast; the trainer's path without
    ``--use-distributed-optimizer``), 1 = megatron-core's distributed optimizer (bf16 parameters,
    fp32 grad buffer, fp32 main parameters and moments sharded over DP x CP), 3 = parameter
    sharding of every model over DP x CP (FSDP2 ``fully_shard``; ``--use-torch-fsdp2``)."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = True
    cp_comm_type: str = "a2a"
    zero: int = 1
    micro_batch_size: int = 1
    num_micro_batches: int = 1
    recompute_num_layers: int = 0
    optimizer_cpu_offload: bool = False
    compiled_blocks: bool = False  # --compile-blocks (training/compile_policy.py)

    def __post_init__(self):
        for name in ("tp", "cp", "pp", "dp", "micro_batch_size", "num_micro_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Layout.{name} must be >= 1, got {getattr(self, name)}")
        if self.zero not in ZERO_LEVELS:
            raise ValueError(f"Layout.zero must be one of {ZERO_LEVELS}, got {self.zero}")
        if self.optimizer_cpu_offload and self.zero == 0:
            raise ValueError("optimizer CPU offload needs zero 1 (distributed optimizer) or 3 (parameter sharding)")
        if self.recompute_num_layers < 0:
            raise ValueError(f"Layout.recompute_num_layers must be >= 0, got {self.recompute_num_layers}")

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def shard_group(self) -> int:
        """Ranks that shard optimizer state, EMA and (zero 3) parameters: DP x CP."""
        return self.dp * self.cp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def flags(self) -> str:
        """The pretrain_rcm.py flags of this layout."""
        out = [f"--tensor-model-parallel-size {self.tp}"]
        if self.sp:
            out.append("--sequence-parallel")
        out.append(f"--context-parallel-size {self.cp}")
        if self.cp > 1:
            out.append(f"--cp-comm-type {self.cp_comm_type}")
        out.append(f"--pipeline-model-parallel-size {self.pp}")
        if self.zero == 1:
            out.append("--use-distributed-optimizer")
        elif self.zero == 3:
            out.append("--use-torch-fsdp2")
        if self.optimizer_cpu_offload:
            out.append("--optimizer-cpu-offload")
        if self.recompute_num_layers:
            out.append(f"--recompute-granularity full --recompute-num-layers {self.recompute_num_layers}")
        out.append(f"--micro-batch-size {self.micro_batch_size}")
        return " ".join(out)


@dataclass(frozen=True)
class Workload:
    """The model and data of a run: architecture, latent [C, T, H, W], text length, method."""

    model: WanConfig
    latent_shape: tuple[int, int, int, int]
    text_len: int = 512
    bf16: bool = True
    method: str = "rcm"
    rollout_max_steps: int = 4
    student_update_freq: int = 10
    global_batch_size: int | None = None
    mode: str = "distill"  # or "teacher": flow-matching pretraining, one trained model, no frozen teacher
    fp8_teacher: bool = False  # --fp8-teacher: the teacher's block linears in FP8 (1 byte a weight + row scales)
    teacher_experts: int = 1  # 2: a two-expert teacher (Wan2.2 A14B), both experts resident on every rank
    first_last_layers_bf16: bool = False  # --first-last-layers-bf16: the first and last block not in FP8

    def __post_init__(self):
        if len(self.latent_shape) != 4:
            raise ValueError(f"--latent-shape takes C T H W, got {self.latent_shape}")
        c, t, h, w = self.latent_shape
        if c != self.model.in_channels:
            raise ValueError(f"--latent-shape has {c} channels, the model takes {self.model.in_channels}")
        for size, p, axis in zip((t, h, w), self.model.patch_size, "THW"):
            if size % p:
                raise ValueError(f"--latent-shape {axis}={size} is not divisible by the patch size {p}")
        if self.teacher_experts not in (1, 2):
            raise ValueError(f"teacher_experts must be 1 or 2 (a two-expert teacher), got {self.teacher_experts}")
        if self.method not in ("rcm", "scm", "dmd", "dcm"):
            raise ValueError(f"method must be rcm, scm, dmd or dcm, got {self.method!r}")

    @property
    def tokens(self) -> int:
        return num_tokens(self.model, self.latent_shape)

    @property
    def uses_fake_score(self) -> bool:
        return self.mode == "distill" and self.method in ("rcm", "dmd")
