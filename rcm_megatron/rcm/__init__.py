"""rCM distillation method: TrigFlow wrapper, time samplers, keyed randomness, losses as
regressions, the step plan and schedule, power EMA, few-step sampling (the optimizers are the
trainer's: ``training/model_building.optimizer_settings``)."""

from .conditioning import Conditioning
from .config import PRESETS, RCMConfig
from .ema import PowerEMA, power_ema_beta, power_ema_gamma
from .losses import LossTerms
from .protocol import VelocityNet
from .rng import KeyedRNG, stable_seed
from .sampling import sample, sampling_times
from .schedule import Phase, phase, tangent_warmup_ratio
from .step import Batch, critic_step, make_critic_targets, make_student_targets, student_regression, student_step
from .time_samplers import LogNormal, SamplerSpec, UniformShift
from .trigflow import Prediction, guided_predict, predict, predict_with_tangent, rf_to_trig, trig_to_rf

__all__ = [
    "Conditioning", "PRESETS", "RCMConfig", "PowerEMA", "power_ema_beta", "power_ema_gamma", "LossTerms",
    "VelocityNet", "KeyedRNG", "stable_seed", "sample", "sampling_times",
    "Phase", "phase", "tangent_warmup_ratio", "Batch", "critic_step", "make_critic_targets", "make_student_targets",
    "student_regression", "student_step", "LogNormal", "SamplerSpec", "UniformShift", "Prediction",
    "guided_predict", "predict", "predict_with_tangent", "rf_to_trig", "trig_to_rf",
]
