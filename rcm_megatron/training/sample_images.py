"""TensorBoard grids every ``--log-images-interval`` iterations: the data, and few-step samples of
the live student (the EMA weights are evaluated by tools/evaluate.py; here the live student
shows training progress)."""

from __future__ import annotations

import torch

from ..rcm import Batch, RCMConfig, sample
from . import pipeline_step
from .throughput import latent_grid


def sampling_net(student, student_net, pipe, micro_batch_size: int, link):
    """The student as a sampler: under PP every stage takes part in each step's forward sweep."""
    if pipe.size > 1:
        return pipeline_step.PipelinedNet(student, micro_batch_size, link)
    return student_net


@torch.no_grad()
def log_samples(logger, batch: Batch, iteration: int, net, rcm: RCMConfig | None, seed: int, autocast) -> None:
    """``rcm`` None (teacher pretraining): the data grid only."""
    n = min(4, batch.x0.shape[0])
    logger.add_image("samples/data", latent_grid(batch.x0[:n].float().cpu()), iteration)
    if rcm is None:
        return
    cond = None if batch.cond is None else batch.cond.select(torch.arange(n))
    with autocast():
        for steps in sorted({1, min(4, rcm.rollout_max_steps)}):
            x = sample(net, batch.context[:n], batch.latent_shape, batch.indices[:n], seed=seed, num_steps=steps,
                       mid_times=rcm.sample_mid_times, sigma_max=rcm.sample_sigma_max, stream="tensorboard", cond=cond)
            logger.add_image(f"samples/student_{steps}step", latent_grid(x.float().cpu()), iteration)
