"""rCM's few-step student schedule as a diffusers scheduler, so an exported student runs in ``WanPipeline``.

The student is a rectified-flow velocity network (TrigFlow only rescales its inputs), and the
rCM sampler is, in RF terms, "predict x0 = x_s - s v, re-noise x_s' = (1 - s') x0 + s' eps" -
exactly diffusers' ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` - on the RF
times s_k = sin t_k / (cos t_k + sin t_k) of the TrigFlow times [atan(sigma_max), mid..., 0]
(``rcm.sampling.sampling_times``). ``WanPipeline`` asks its scheduler for
``num_inference_steps`` steps, so this subclass maps that count to the rCM times:

    from diffusers import WanPipeline, WanTransformer3DModel
    from rcm_megatron.convert.diffusers_scheduler import RCMFlowMatchScheduler
    student = WanTransformer3DModel.from_pretrained("wan-rcm-student", torch_dtype=torch.bfloat16)
    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", transformer=student,
                                       scheduler=RCMFlowMatchScheduler(), torch_dtype=torch.bfloat16)
    video = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).frames[0]   # no CFG: distilled in

The pipeline starts from unit noise at s_0 = 80/81, where rCM starts from x_s0 = eps / (cos t_0 +
sin t_0) (1.2% smaller at sigma_max 80); pass ``latents=initial_latents(noise)`` for the exact
start. Noise for re-noising comes from the pipeline's generator, or, after
``scheduler.use_keyed_noise(seed, indices)``, from rCM's keyed streams, so the pipeline
reproduces ``tools/generate.py --seed S`` step for step. ``sigma_max`` and ``mid_times`` are
saved in ``scheduler_config.json`` (``save_pretrained`` / ``from_pretrained`` round-trip).
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from ..rcm.rng import KeyedRNG, index_list
from ..rcm.sampling import OFFICIAL_MID_TIMES, sampling_times


def rf_time(t: float) -> float:
    """TrigFlow time -> rectified-flow time (the sigma of diffusers' flow schedulers)."""
    return math.sin(t) / (math.cos(t) + math.sin(t))


class RCMFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler (stochastic sampling, no shift) whose ``set_timesteps(N)``
    yields the rCM student's N-step schedule (N = 1 .. len(mid_times) + 1)."""

    def __init__(self, sigma_max: float = 80.0, mid_times=OFFICIAL_MID_TIMES, **kwargs):
        kwargs.update(stochastic_sampling=True, shift=1.0, use_dynamic_shifting=False)
        super().__init__(**kwargs)
        self.rcm_sigma_max, self.rcm_mid_times = float(sigma_max), tuple(float(t) for t in mid_times)
        self.register_to_config(sigma_max=self.rcm_sigma_max, mid_times=list(self.rcm_mid_times))
        self._keyed_noise = None

    @staticmethod
    def _get_init_keys(input_class):
        """The parent's settings are ours too (``from_pretrained`` passes them through ``**kwargs``)."""
        keys = set(inspect.signature(input_class.__init__).parameters)
        if isinstance(input_class, type) and issubclass(input_class, RCMFlowMatchScheduler):
            keys |= set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters)
        return keys

    def use_keyed_noise(self, seed: int, indices, iteration: int = 0, stream: str = "sample") -> None:
        """Re-noise sample i with rCM's stream f'{stream}.renoise.k' of (seed, iteration, indices[i]),
        as ``rcm.sampling.sample`` does; ``None`` seed: back to the pipeline's generator."""
        self._keyed_noise = None if seed is None else (KeyedRNG(seed, iteration), stream, index_list(indices))

    def rcm_sigmas(self, num_steps: int) -> list[float]:
        times = sampling_times(num_steps, self.rcm_mid_times, self.rcm_sigma_max)[:num_steps]
        return [rf_time(t) for t in times]

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None:
            sigmas = self.rcm_sigmas(int(num_inference_steps))
        super().set_timesteps(device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        if self._keyed_noise is None:
            return super().step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.step_index
        sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        prev = x0 = sample.float() - sigma * model_output.float()
        if sigma_next > 0:
            rng, stream, idx = self._keyed_noise
            eps = rng.normal(f"{stream}.renoise.{k}", idx, tuple(sample.shape[1:]), device=sample.device)
            prev = (1.0 - sigma_next) * x0 + sigma_next * eps.float()
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def initial_latents(noise: torch.Tensor, sigma_max: float = 80.0) -> torch.Tensor:
    """rCM's starting state in the pipeline's (RF) scale: eps / (cos t0 + sin t0), t0 = atan(sigma_max)."""
    t0 = math.atan(sigma_max)
    return noise / (math.cos(t0) + math.sin(t0))
