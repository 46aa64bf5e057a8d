"""Where an iteration's micro-batches come from: webdataset shards through ``ShardLoader``
(prefetched, resumable position) or an in-memory dataset (toy, synthetic, a .pt latent file)
indexed by the layout-independent global batch of the iteration.

Either way every DP rank takes its slice of the same global batch, so results do not depend
on the parallel layout. Image-to-video data also give each batch its ``Conditioning``
(``data/conditions.py``: condition channels, a given first frame, image embeddings), in the
layout the model takes; the latents have the model's ``out_channels``.
"""

from __future__ import annotations

from ..data import build_dataset, global_batch_indices, local_slice
from ..data import conditions
from ..models import WanConfig
from ..rcm import Batch
from .arguments import ArgumentError, TrainingConfig
from .rank_context import RankContext


def open_dataset(train: TrainingConfig, cfg: WanConfig):
    """The dataset named by --data (checked before any model is built)."""
    from ..data.shards import ShardDataset, is_shard_spec

    if is_shard_spec(train.data):
        return ShardDataset(train.data, max_latent_magnitude=train.max_latent_magnitude)
    return build_dataset(train.data, cfg.out_channels, cfg.text_dim, train.latent_shape, seed=train.seed,
                         max_latent_magnitude=train.max_latent_magnitude)


def check_data_against_model(dataset, cfg: WanConfig, source: str) -> None:
    """Latent channels, patch divisibility, text width and image conditioning of the data vs the model."""
    c, t, h, w = dataset.latent_shape
    if c != cfg.out_channels:  # an image model's in_channels also count its condition channels
        expects = (f"in_channels={cfg.in_channels}" if cfg.in_channels == cfg.out_channels else
                   f"out_channels={cfg.out_channels} (in_channels {cfg.in_channels} include the condition)")
        raise ArgumentError(f"{source}: latents have {c} channels, the model expects {expects}")
    for size, p, axis in zip((t, h, w), cfg.patch_size, ("T", "H", "W")):
        if size % p:
            raise ArgumentError(f"{source}: latent {axis}={size} is not divisible by the patch size {p} "
                                f"(latent shape {(c, t, h, w)}, patch {cfg.patch_size})")
    if dataset.text_dim != cfg.text_dim:
        raise ArgumentError(f"{source}: text embeddings have width {dataset.text_dim}, the model expects "
                            f"text_dim={cfg.text_dim}")
    problem = conditions.check(getattr(dataset, "conditions", ()), c, cfg, source,
                               condition_width=getattr(dataset, "condition_channels", None),
                               image_dim=getattr(dataset, "image_dim", None))
    if problem:
        raise ArgumentError(problem)


class BatchSource:
    def __init__(self, dataset, train: TrainingConfig, micro_batch_size: int, ctx: RankContext,
                 model_cfg: WanConfig | None = None):
        from ..data.shards import ShardDataset, ShardLoader

        self.model_cfg = model_cfg
        self.dataset, self.seed, self.micro_batch_size, self.ctx = dataset, train.seed, micro_batch_size, ctx
        self.uncond = dataset.negative_context.unsqueeze(0).to(ctx.device)
        self.loader = None
        if isinstance(dataset, ShardDataset):
            self.loader = ShardLoader(dataset, ctx.dp_rank, ctx.dp_size, micro_batch_size, train.seed,
                                      global_batch_size=ctx.global_batch)

    def micro_batches(self, it: int):
        """This DP rank's micro-batches of iteration ``it`` (a generator)."""
        ctx = self.ctx
        if self.loader is not None:
            raws = (self.loader.next_batch() for _ in range(ctx.num_micro))
        else:
            idx = global_batch_indices(self.seed, it, ctx.global_batch, len(self.dataset))
            local = local_slice(idx, ctx.dp_rank, ctx.dp_size)
            mbs = self.micro_batch_size
            raws = (self.dataset.batch(local[k * mbs:(k + 1) * mbs]) for k in range(ctx.num_micro))
        for raw in raws:
            cond = None if self.model_cfg is None else conditions.batch_conditioning(raw, self.model_cfg, ctx.device)
            yield Batch(x0=raw["latents"].to(ctx.device), context=raw["context"].to(ctx.device),
                        uncond_context=self.uncond, indices=raw["index"], cond=cond)

    def metrics(self) -> dict:
        if self.loader is None:
            return {}
        return {"bad_samples": self.loader.bad_samples, "bad_shards": self.loader.bad_shards}

    def set_iteration(self, iteration: int) -> None:
        if self.loader is not None:
            self.loader.set_iteration(iteration)

    def state_dict(self) -> dict | None:
        return self.loader.state_dict() if self.loader is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.loader is not None and state is not None:
            self.loader.load_state_dict(state)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
