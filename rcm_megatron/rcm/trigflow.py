"""TrigFlow view of a rectified-flow network (docs/design.md §2.1).

x_t = cos t x0 + sin t eps, t in [0, pi/2], sigma_data = 1. With a = cos t + sin t:
c_in = c_skip = 1/a, c_out = -sin t/a, c_noise = 1000 sin t/a (RF time s = sin t/a, x1000),
x0_hat = c_skip x_t + c_out v,  v = net(c_in x_t, c_noise),
F = (cos t x_t - x0_hat)/sin t = ((cos t - sin t) x_t + v)/a.

The last form is algebraically identical and is what we evaluate: it has no 1/sin t, so
it stays exact near t = 0. Coefficients and every output are float64 (the losses
normalize per sample in fp64); only the network sees its own dtype (timesteps >= fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .conditioning import Conditioning, resolve
from .protocol import VelocityNet, net_dtype, timestep_dtype

RF_TIME_SCALE = 1000.0


def rf_to_trig(s: Tensor) -> Tensor:
    """RF time s in [0,1] -> TrigFlow t = atan(s/(1-s)); atan2 keeps s = 1 -> pi/2 exact."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return torch.atan2(s, 1.0 - s)


def wan_time_shift(u: Tensor, shift: float) -> Tensor:
    """Wan's timestep shift of an RF time u in [0, 1]: s = k u / (1 + (k - 1) u), k = ``shift``
    (identity at k = 1). The one definition behind Wan's training sampler, its sampling grids
    and the dCM grid."""
    return shift * u / (1 + (shift - 1) * u)


def trig_to_rf(t: Tensor) -> Tensor:
    """TrigFlow t -> RF time s = sin t/(cos t + sin t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """[B] float64 time -> [B,1,...,1] matching ``like``'s rank."""
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class Prediction:
    """Wrapper outputs, float64: the clean-data estimate and the TrigFlow velocity."""

    x0: Tensor
    F: Tensor


def _net_inputs(net: VelocityNet, x_t: Tensor, t: Tensor, cond: Conditioning):
    """Per-element time (0 on given frames), x_t with given frames in, network latents and timestep."""
    dtype = net_dtype(net)
    ts = expand_time(t, x_t)
    keep = cond.generated(x_t)
    tb = ts if keep is None else ts * keep
    cos, sin = torch.cos(tb), torch.sin(tb)
    a = cos + sin
    x = cond.with_given(x_t.to(torch.float64))
    latents = cond.network_input((x / a).to(dtype))
    c_noise = (RF_TIME_SCALE * torch.sin(ts) / (torch.cos(ts) + torch.sin(ts))).reshape(-1)
    c_noise = cond.token_timestep(c_noise, x_t.shape).to(timestep_dtype(dtype))
    return cos, sin, a, x, latents, c_noise


def predict(net: VelocityNet, x_t: Tensor, t: Tensor, context: Tensor, cond: Conditioning | None = None) -> Prediction:
    """(x0_hat, F) of ``net`` at (x_t, t); differentiable wherever grad mode is on.
    With given frames (``cond.given``) x0_hat is the given latents there and F is 0 (excluded)."""
    cond = resolve(cond)
    cos, sin, a, x, latents, c_noise = _net_inputs(net, x_t, t, cond)
    v = net(latents, c_noise, context, **cond.net_kwargs()).to(torch.float64)
    return Prediction(x0=(x - sin * v) / a, F=cond.exclude(((cos - sin) * x + v) / a))


@torch.no_grad()
def predict_with_tangent(
    net: VelocityNet, x_t: Tensor, t: Tensor, context: Tensor, dx: Tensor, dt: Tensor,
    cond: Conditioning | None = None,
) -> tuple[Tensor, Tensor]:
    """(F, dF): F and its derivative along the tangent (dx, dt), float64, no grad.

    Product rule through the wrapper (a = cos+sin, b = cos-sin, a' = b, b' = -a):
      d(c_in x)  = dx/a - (b/a^2) dt x,      d c_noise = 1000 dt/a^2,
      dv         = net tangent of those,
      dF         = (b dx + dv - b F dt)/a - x dt.
    Given frames are fixed at time 0: dx = dt = 0 there (and F, dF are excluded, 0).
    Condition channels are not differentiated: the tangent covers the noisy channels only.
    """
    cond = resolve(cond)
    cos, sin, a, x, latents, c_noise = _net_inputs(net, x_t, t, cond)
    b = cos - sin
    ts = expand_time(dt, x_t)
    keep = cond.generated(x_t)
    dtb = ts if keep is None else ts * keep
    dx = cond.exclude(dx.to(torch.float64))
    latents_tan = (dx / a - b / a**2 * dtb * x).to(latents.dtype)
    per_sample = expand_time(t, x_t)
    a_s = torch.cos(per_sample) + torch.sin(per_sample)
    c_noise_tan = (RF_TIME_SCALE * ts / a_s**2).reshape(-1)
    c_noise_tan = cond.token_timestep(c_noise_tan, x_t.shape).to(c_noise.dtype)
    v, dv = net.forward_with_tangent(latents, c_noise, context, latents_tan, c_noise_tan, **cond.net_kwargs())
    v, dv = v.to(torch.float64), dv.to(torch.float64)
    F = (b * x + v) / a
    dF = (b * dx + dv - b * F * dtb) / a - x * dtb
    return cond.exclude(F), cond.exclude(dF)


def _uncond(uncond_context: Tensor, batch: int) -> Tensor:
    """Negative-prompt embedding [1 or B, L, D] -> [B, L, D]."""
    if uncond_context.shape[0] not in (1, batch):
        raise ValueError(f"uncond_context batch must be 1 or {batch}, got {uncond_context.shape[0]}")
    return uncond_context.expand(batch, *uncond_context.shape[1:])


def guided_predict(
    net: VelocityNet, x_t: Tensor, t: Tensor, context: Tensor, uncond_context: Tensor, scale: float,
    cond: Conditioning | None = None,
) -> Prediction:
    """Classifier-free guidance: P_u + w (P_c - P_u) for both x0 and F (affine in v, so
    guiding either is the same). Two network calls (cond, uncond) keep peak memory at B.
    The image condition ``cond`` is on both sides (only the text is dropped)."""
    c = predict(net, x_t, t, context, cond)
    u = predict(net, x_t, t, _uncond(uncond_context, x_t.shape[0]), cond)
    return Prediction(x0=u.x0 + scale * (c.x0 - u.x0), F=u.F + scale * (c.F - u.F))


@torch.no_grad()
def guided_predict_with_tangent(
    net: VelocityNet, x_t: Tensor, t: Tensor, context: Tensor, uncond_context: Tensor, scale: float,
    dx: Tensor, dt: Tensor, cond: Conditioning | None = None,
) -> tuple[Tensor, Tensor]:
    """(F_T, dF_T) with guidance; the guidance combination is linear, so is its tangent."""
    Fc, dFc = predict_with_tangent(net, x_t, t, context, dx, dt, cond)
    Fu, dFu = predict_with_tangent(net, x_t, t, _uncond(uncond_context, x_t.shape[0]), dx, dt, cond)
    return Fu + scale * (Fc - Fu), dFu + scale * (dFc - dFu)


def add_noise(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = cos t x0 + sin t eps in float64."""
    tb = expand_time(t, x0)
    return torch.cos(tb) * x0.to(torch.float64) + torch.sin(tb) * eps.to(torch.float64)
