"""Image conditioning carried through every pass of the method (image-to-video).

One ``Conditioning`` per batch goes to teacher (both CFG sides: the image is part of both, as
in diffusers' ``WanImageToVideoPipeline``), student and fake score alike, in every forward,
tangent, with-grad, rollout and critic pass. Three forms, combinable:

- ``image_context`` [B, L_img, image_dim]: CLIP image tokens (Wan2.1 I2V), passed to the
  network as its ``image_context`` keyword.
- ``concat`` [B, C_cond, T, H, W]: condition channels (Wan2.1 / Wan2.2 I2V: mask 4 + latents 16)
  concatenated after the noisy latents. The TrigFlow wrapper's c_in / c_skip / c_out apply to
  the noisy channels only: the network input is cat([c_in x_t, concat]); its tangent covers the
  noisy channels only (the condition is fixed).
- ``given`` [B, C, F, H, W]: clean latents of the first F latent frames (Wan2.2 TI2V). Those
  positions are replaced by ``given`` in every network input, sit at time 0 (per-token timestep
  0, ``models.timesteps.expand_timesteps``) and carry zero time tangent. They are not generated,
  so they are excluded from every loss (TrigFlow's F = (cos t x_t - x0_hat)/sin t is 0/0 there):
  F and its tangent are set to 0 there, and ``generated`` masks g, the regressions and the
  per-sample normalizations (||g||, the DMD weight).

Two-expert teachers (``models.experts.WanExperts``, Wan2.2 A14B) need nothing here: the wrapper's
c_noise = 1000 sin t/(cos t + sin t) is the flow-matching timestep 1000 sigma the experts route on,
so each call (per sample) runs the high-noise expert at t >= atan(b/(1-b)) (b = boundary_ratio:
I2V 0.9 -> t >= 1.4601) and the low-noise expert below.

Student and fake score of a two-expert teacher: ``pretrain_rcm.py`` builds ONE network each,
initialized from the low-noise expert by default (``--expert-init high_noise``: the other one;
``training.model_building.build_models`` says why; toy comparison in docs/quality.md). The alternative, one network per expert (a ``WanExperts`` student
and fake score initialized expert by expert), starts equal to the teacher over the whole time range
(above the I2V boundary lie 35% of p_d's times and 32% of the 14B p_g's sCM times; the 4-step
schedule runs two steps on each side) at the cost of a second copy of the trained weights and
optimizer state; its tangent loss is local in t and does not tie the two student experts together
at the boundary. It works at the library level (any ``VelocityNet`` in every role) but is not built
by the trainer and has not been compared on the toy task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.timesteps import expand_timesteps, token_grid


@dataclass
class Conditioning:
    image_context: Tensor | None = None
    concat: Tensor | None = None
    given: Tensor | None = None
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self):
        sizes = {name: getattr(self, name).shape[0] for name in ("image_context", "concat", "given")
                 if getattr(self, name) is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning: every field must have the same batch size, got {sizes}")
        if self.image_context is not None and self.image_context.dim() != 3:
            raise ValueError(f"Conditioning.image_context: expected [B,L,D], got {tuple(self.image_context.shape)}")
        for name in ("concat", "given"):
            x = getattr(self, name)
            if x is not None and x.dim() != 5:
                raise ValueError(f"Conditioning.{name}: expected [B,C,T,H,W], got {tuple(x.shape)}")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.given is not None and self.given.shape[2] % self.patch_size[0]:
            raise ValueError(f"Conditioning.given: {self.given.shape[2]} latent frames is not a whole number of "
                             f"token frames (temporal patch {self.patch_size[0]})")

    @property
    def batch_size(self) -> int | None:
        for x in (self.image_context, self.concat, self.given):
            if x is not None:
                return x.shape[0]
        return None

    def check(self, latent_shape: tuple[int, ...], batch: int) -> None:
        """Raise one line naming the field if it does not fit latents of per-sample ``latent_shape``."""
        if self.batch_size not in (None, batch):
            raise ValueError(f"Conditioning: batch size {self.batch_size}, expected {batch}")
        c, t, h, w = latent_shape
        if self.concat is not None and tuple(self.concat.shape[2:]) != (t, h, w):
            raise ValueError(f"Conditioning.concat: expected [B,C_cond,{t},{h},{w}], got {tuple(self.concat.shape)}")
        if self.given is not None and (self.given.shape[1] != c or tuple(self.given.shape[3:]) != (h, w)
                                       or self.given.shape[2] > t):
            raise ValueError(f"Conditioning.given: expected [B,{c},F<={t},{h},{w}], got {tuple(self.given.shape)}")

    def select(self, rows: Tensor) -> "Conditioning":
        """The conditioning of samples ``rows`` (a sub-batch, e.g. the active samples of a rollout step)."""
        pick = lambda x: None if x is None else x[rows.to(x.device)]  # noqa: E731
        return Conditioning(pick(self.image_context), pick(self.concat), pick(self.given), self.patch_size)

    @staticmethod
    def cat(conds: list["Conditioning | None"]) -> "Conditioning | None":
        """Micro-batches' conditionings joined in batch order (None when all are None)."""
        if all(c is None for c in conds):
            return None
        if any(c is None for c in conds):
            raise ValueError("Conditioning.cat: either every micro-batch has a conditioning or none has")
        join = lambda name: None if getattr(conds[0], name) is None else torch.cat([getattr(c, name) for c in conds])  # noqa: E731
        return Conditioning(join("image_context"), join("concat"), join("given"), conds[0].patch_size)

    # ------------------------------------------------------------ network inputs

    def net_kwargs(self) -> dict:
        """Keyword arguments of the network call (none for text-only networks)."""
        return {} if self.image_context is None else {"image_context": self.image_context}

    def network_input(self, latents: Tensor) -> Tensor:
        """cat([c_in x_t, condition channels]) in the latents' dtype."""
        if self.concat is None:
            return latents
        return torch.cat([latents, self.concat.to(device=latents.device, dtype=latents.dtype)], dim=1)

    def token_timestep(self, timestep: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        """[B] -> [B, S] with 0 on the given first frame (linear, so also maps time tangents)."""
        if self.given is None:
            return timestep
        grid = token_grid(latent_shape, self.patch_size)
        return expand_timesteps(timestep, grid, self.given.shape[2] // self.patch_size[0])

    # ------------------------------------------------------------ given positions

    def generated(self, like: Tensor) -> Tensor | None:
        """[1,1,T,1,1] bool, True where latents are generated; None without a given frame."""
        if self.given is None:
            return None
        keep = torch.ones(like.shape[2], dtype=torch.bool, device=like.device)
        keep[: self.given.shape[2]] = False
        return keep.view(1, 1, -1, 1, 1)

    def with_given(self, x: Tensor) -> Tensor:
        """x with the given frames replaced by their clean latents (same dtype as x)."""
        if self.given is None:
            return x
        f = self.given.shape[2]
        return torch.cat([self.given.to(device=x.device, dtype=x.dtype), x[:, :, f:]], dim=2)

    def exclude(self, x: Tensor) -> Tensor:
        """x with 0 at the given positions (NaN there too: they are not part of any loss)."""
        keep = self.generated(x)
        return x if keep is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def num_generated(self, like: Tensor) -> int:
        """Elements per sample that the losses see."""
        per_sample = like[0].numel()
        if self.given is None:
            return per_sample
        return per_sample // like.shape[2] * (like.shape[2] - self.given.shape[2])


NO_CONDITION = Conditioning()


def resolve(cond: Conditioning | None) -> Conditioning:
    return NO_CONDITION if cond is None else cond
