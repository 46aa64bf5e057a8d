"""rCM distillation method: TrigFlow wrapper, time samplers, keyed randomness, losses as
regressions, the step plan and schedule, power EMA, few-step sampling (the optimizers are the
trainer's: ``training/model_building.optimizer_settings``)."""

from rcm_megatron import lazy_exports

# name -> submodule, imported on first use (see rcm_megatron.lazy_exports)
_EXPORTS = {
    "Conditioning": ".conditioning",
    "PRESETS": ".config",
    "RCMConfig": ".config",
    "PowerEMA": ".ema",
    "power_ema_beta": ".ema",
    "power_ema_gamma": ".ema",
    "LossTerms": ".losses",
    "VelocityNet": ".protocol",
    "KeyedRNG": ".rng",
    "stable_seed": ".rng",
    "sample": ".sampling",
    "sampling_times": ".sampling",
    "Phase": ".schedule",
    "phase": ".schedule",
    "tangent_warmup_ratio": ".schedule",
    "Batch": ".step",
    "critic_step": ".step",
    "make_critic_targets": ".step",
    "make_student_targets": ".step",
    "student_regression": ".step",
    "student_step": ".step",
    "LogNormal": ".time_samplers",
    "SamplerSpec": ".time_samplers",
    "UniformShift": ".time_samplers",
    "Prediction": ".trigflow",
    "guided_predict": ".trigflow",
    "predict": ".trigflow",
    "predict_with_tangent": ".trigflow",
    "rf_to_trig": ".trigflow",
    "trig_to_rf": ".trigflow",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Conditioning", "PRESETS", "RCMConfig", "PowerEMA", "power_ema_beta", "power_ema_gamma", "LossTerms",
    "VelocityNet", "KeyedRNG", "stable_seed", "sample", "sampling_times",
    "Phase", "phase", "tangent_warmup_ratio", "Batch", "critic_step", "make_critic_targets", "make_student_targets",
    "student_regression", "student_step", "LogNormal", "SamplerSpec", "UniformShift", "Prediction",
    "guided_predict", "predict", "predict_with_tangent", "rf_to_trig", "trig_to_rf",
]
