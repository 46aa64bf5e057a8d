"""The rCM step plan under pipeline parallelism (docs/design.md §2.5, "Every training pass is
a regression"; the schedules are in ``parallel/pipeline.py``).

Every stage runs the method code of ``rcm/`` unchanged, in lockstep, on the DP rank's whole
local batch (its micro-batches concatenated; every random draw is keyed by seed, iteration
and sample index, so that is the same computation per sample as micro-batch by micro-batch):

(a) ``make_student_targets`` / ``make_critic_targets`` get ``PipelinedNet`` views of the
    stage models. Each network call (teacher cond / uncond, the sCM tangent pass, every
    rollout step, fake score and teacher on the rollout output) becomes one forward sweep
    over micro-batch chunks of the call's batch: the first stage embeds, every stage runs
    its blocks, the last stage applies the head. The last stage's output (and tangent) is
    then broadcast over the pipeline group, so every stage continues the method code with
    the same values: the first stage re-noises the rollout's x0 for the next step, and every
    stage ends with the same per-sample targets and weights.
(b) One 1F1B pass per trained model over the items (micro-batch, loss term): each item is
    the unchanged ``*_regression`` call with a ``_StageCall`` as the network. The first
    stage's call embeds the regression input and hands its activations to the schedule;
    the last stage's call returns the velocity from the received activations, the
    regression computes the loss against the stored targets, and its backward starts.

Only the last stage computes losses; the other stages return zeros under the same keys
(the trainer broadcasts the last stage's values for logging).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..models.wan import FP32_MODULE_KEYWORDS, StageState, WanDiT
from ..parallel import fsdp
from ..parallel.pipeline import StageLink, forward_sweep, one_f_one_b
from ..rcm.conditioning import Conditioning
from ..rcm.losses import critic_regression
from ..rcm.schedule import Phase
from ..rcm.step import Batch, make_critic_targets, make_student_targets, student_diagnostics, student_regression
from ..checkpointing import sharded_state as ss
from .flow_matching import flow_matching_loss


def model_dtype(model: WanDiT) -> torch.dtype:
    """The dtype the whole model reports at PP = 1 (its patch embedding's), on every stage:
    that of any parameter outside the modules kept in fp32."""
    fallback = None
    for name, p in model.named_parameters():
        fallback = fallback or p.dtype
        if not any(k in name for k in FP32_MODULE_KEYWORDS):
            return p.dtype
    return fallback or torch.float32


def _grid(model: WanDiT, shape) -> tuple[int, int, int]:
    pt, ph, pw = model.config.patch_size
    return shape[2] // pt, shape[3] // ph, shape[4] // pw


def stage_forward(model: WanDiT, latents, timestep, context, latents_tan, timestep_tan, received, image_context=None):
    """This stage's share of ``net(latents, timestep, context, image_context)`` (with tangent when
    latents_tan is given). Returns the activations to send on, [x, x_tan, embedded text, embedded image
    tokens (None for text-only models)], or on the last stage the head's (v, dv).

    ZeRO-3: a forward-only call leaves the gathered units gathered (the DP ranks' no-grad sweeps
    differ in number: only their first gathers), a call with grad reshards after it, as
    ``fsdp_backend.LockstepNet`` does at PP = 1."""
    fsdp.set_reshard_after_forward(model, torch.is_grad_enabled())
    if model.pre_process:
        model.check_inputs(latents, timestep, context, image_context)
        state = model.embed(latents, timestep, context, latents_tan, timestep_tan, image_context)
    else:
        x, x_tan, ctx, img = received
        state = StageState(x, x_tan, None, None, None, None, ctx, _grid(model, latents.shape), img)
        state = model.time_conditioning(state, timestep, timestep_tan)  # FSDP2 may hand back a copy
    state = model.run_blocks(state)
    if model.post_process:
        return model.head(state, (latents.shape[0], model.config.out_channels, *latents.shape[2:]))
    return [state.x, state.x_tan, state.context, state.image_context]


class PipelinedNet:
    """VelocityNet of a pipelined model for forward-only calls on a whole micro-batch list.

    A call with batch n runs as one ``forward_sweep`` over ceil(n / micro_batch_size)
    chunks and returns the output in float64 on every stage of the pipeline (the rCM
    wrapper works in float64 anyway). No autograd graph is built.
    """

    def __init__(self, model: WanDiT, micro_batch_size: int, link: StageLink):
        self.model, self.micro_batch_size, self.link = model, int(micro_batch_size), link
        self.dtype = model_dtype(model)

    def __call__(self, latents: Tensor, timestep: Tensor, context: Tensor, image_context: Tensor | None = None
                 ) -> Tensor:
        return self._call(latents, timestep, context, None, None, image_context)[0]

    def forward_with_tangent(self, latents, timestep, context, latents_tan, timestep_tan, image_context=None):
        if timestep_tan is None:
            timestep_tan = torch.zeros_like(timestep)
        return self._call(latents, timestep, context, latents_tan, timestep_tan, image_context)

    @torch.no_grad()
    def _call(self, latents, timestep, context, latents_tan, timestep_tan, image_context):
        n, mbs = latents.shape[0], self.micro_batch_size
        chunks = [slice(lo, min(lo + mbs, n)) for lo in range(0, n, mbs)]
        part = lambda x, s: None if x is None else x[s]  # noqa: E731

        def step(k, received):
            s = chunks[k]
            return stage_forward(self.model, latents[s], timestep[s], context[s], part(latents_tan, s),
                                 part(timestep_tan, s), received, part(image_context, s))

        outs = forward_sweep(len(chunks), step, self.link)
        tangent = latents_tan is not None
        shape = (n, self.model.config.out_channels, *latents.shape[2:])
        result = torch.empty((2 if tangent else 1, *shape), dtype=torch.float64, device=latents.device)
        if self.link.layout.is_last:
            result[0] = torch.cat([v for v, _ in outs])
            if tangent:
                result[1] = torch.cat([dv for _, dv in outs])
        self.link.layout.broadcast_from_last(result)
        return result[0], (result[1] if tangent else None)


class _StageOutput(Exception):
    """Raised by a non-last stage's network call: its activations are ready to send on."""

    def __init__(self, tensors):
        super().__init__("stage output")
        self.tensors = tensors


class _StageCall:
    """The network of one with-grad regression item on this stage (called exactly once)."""

    def __init__(self, model: WanDiT, inputs):
        self.model, self.inputs, self.called = model, inputs, False
        self.dtype = model_dtype(model)

    def __call__(self, latents, timestep, context, image_context=None):
        if self.called:
            raise RuntimeError("a pipelined regression item must call its network exactly once")
        self.called = True
        out = stage_forward(self.model, latents, timestep, context, None, None, self.inputs, image_context)
        if not self.model.post_process:
            raise _StageOutput(out)
        return out[0]

    def forward_with_tangent(self, *args, **kwargs):
        raise RuntimeError("tangent passes are forward-only: use PipelinedNet")


def run_regressions(model: WanDiT, items, link: StageLink) -> dict[str, Tensor]:
    """1F1B over ``items`` = [(key, fn)], fn(net) -> scalar loss; returns per-key loss sums
    (float64; zeros except on the last stage). Gradients accumulate in ``model``."""
    totals = {key: 0.0 for key, _ in items}

    def step(k, inputs):
        key, fn = items[k]
        call = _StageCall(model, inputs)
        try:
            loss = fn(call)
        except _StageOutput as out:
            return out.tensors
        if not call.called:
            raise RuntimeError(f"regression item {key} did not call its network")
        totals[key] = totals[key] + loss.detach().to(torch.float64)  # stays on the device: no sync per item
        return loss

    one_f_one_b(len(items), step, link, before_backward=lambda last: fsdp.set_gradient_sync(model, last))
    return {key: torch.as_tensor(v, dtype=torch.float64).cpu() for key, v in totals.items()}


def is_pipeline_replicated(name: str) -> bool:
    """Parameters every stage holds (the time embedding): their gradients are partial per stage."""
    return name.startswith(ss.PIPELINE_REPLICATED)


def all_reduce_replicated_grads(model: WanDiT, layout) -> None:
    """Sum the gradients of pipeline-replicated parameters over the stages (each stage's covers
    only its own blocks), so every stage steps them identically."""
    if layout.size == 1:
        return
    for name, p in model.named_parameters():
        if p.requires_grad and is_pipeline_replicated(name):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            layout.all_reduce(p.grad)


# ------------------------------------------------------------------ the step plan


def concat_batches(batches: list[Batch]) -> Batch:
    """The micro-batches as one batch (their conditionings joined too)."""
    unc = [b.uncond_context for b in batches]
    uncond = unc[0] if all(u.shape[0] == 1 for u in unc) else torch.cat([u.expand(b.x0.shape[0], *u.shape[1:])
                                                                          for u, b in zip(unc, batches)])
    return Batch(x0=torch.cat([b.x0 for b in batches]), context=torch.cat([b.context for b in batches]),
                 uncond_context=uncond, indices=torch.cat([b.indices for b in batches]),
                 cond=Conditioning.cat([b.cond for b in batches]))


def slice_samples(obj, lo: int, hi: int, n: int):
    """Samples lo:hi of every per-sample tensor (leading dim n) in a (nested) targets dataclass."""
    if torch.is_tensor(obj):
        return obj[lo:hi] if obj.dim() >= 1 and obj.shape[0] == n else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: slice_samples(getattr(obj, f.name), lo, hi, n)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _bounds(batches: list[Batch]):
    lo = 0
    for b in batches:
        hi = lo + b.x0.shape[0]
        yield b, lo, hi
        lo = hi


def _micro_batch_size(batches: list[Batch]) -> int:
    return max(b.x0.shape[0] for b in batches)


def _mean(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64).mean().cpu()


def student_step(cfg, teacher: WanDiT, student: WanDiT, fake_score: WanDiT | None, batches: list[Batch],
                 iteration: int, link: StageLink, *, loss_normalizer: float, phase: Phase | None = None
                 ) -> dict[str, Tensor]:
    """Pipelined ``rcm.step.student_step`` over the micro-batches of one DP rank.

    Returns 'loss_<term>' sums over the micro-batches (each divided by loss_normalizer;
    meaningful on the last stage) and diagnostics over the whole local batch (every stage).
    """
    mbs = _micro_batch_size(batches)
    whole = concat_batches(batches)
    nets = [None if m is None else PipelinedNet(m, mbs, link) for m in (teacher, student, fake_score)]
    targets = make_student_targets(cfg, *nets, whole, iteration, phase)
    n = whole.x0.shape[0]
    items = []
    for b, lo, hi in _bounds(batches):
        part = slice_samples(targets, lo, hi, n)
        for name in targets.phase.losses:
            items.append((f"loss_{name}", lambda net, part=part, b=b, name=name:
                          student_regression(cfg, net, part, b, name).loss / loss_normalizer))
    return run_regressions(student, items, link) | student_diagnostics(targets)


def critic_step(cfg, student: WanDiT, fake_score: WanDiT, batches: list[Batch], iteration: int, link: StageLink,
                *, loss_normalizer: float) -> dict[str, Tensor]:
    """Pipelined ``rcm.step.critic_step``: a forward-only student rollout, then 1F1B of the fake score."""
    whole = concat_batches(batches)
    targets = make_critic_targets(cfg, PipelinedNet(student, _micro_batch_size(batches), link), whole, iteration)
    n = whole.x0.shape[0]
    items = []
    for b, lo, hi in _bounds(batches):
        part = slice_samples(targets, lo, hi, n)
        items.append(("loss_critic", lambda net, part=part, b=b:
                      critic_regression(net, part, b.context, cond=b.cond).loss / loss_normalizer))
    return run_regressions(fake_score, items, link) | {"critic_t_mean": _mean(targets.t_D),
                                                      "critic_valid_frac": _mean(targets.valid)}


def flow_matching_step(model: WanDiT, batches: list[Batch], seed: int, iteration: int, link: StageLink, *,
                       loss_normalizer: float) -> dict[str, Tensor]:
    """Teacher pretraining (``--mode teacher``): one 1F1B pass of the flow-matching regression."""
    items = [("loss_flow_matching", lambda net, b=b:
              flow_matching_loss(net, b.x0, b.context, b.uncond_context, b.indices, seed, iteration, cond=b.cond)[0]
              / loss_normalizer) for b in batches]
    return run_regressions(model, items, link)
