"""Training data: per-sample video latents and text embeddings, and the deterministic
global-batch order that makes every parallel layout see the same samples."""

from .datasets import LatentDataset, SyntheticLatents, TensorFileLatents, build_dataset
from .sampler import global_batch_indices, local_slice

__all__ = ["LatentDataset", "SyntheticLatents", "TensorFileLatents", "build_dataset", "global_batch_indices",
           "local_slice"]
