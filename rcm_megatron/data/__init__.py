"""Training data: per-sample video latents and text embeddings, and the deterministic
global-batch order that makes every parallel layout see the same samples."""

from rcm_megatron import lazy_exports

# name -> submodule, imported on first use (see rcm_megatron.lazy_exports)
_EXPORTS = {
    "LatentDataset": ".datasets",
    "SyntheticLatents": ".datasets",
    "TensorFileLatents": ".datasets",
    "build_dataset": ".datasets",
    "global_batch_indices": ".sampler",
    "local_slice": ".sampler",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["LatentDataset", "SyntheticLatents", "TensorFileLatents", "build_dataset", "global_batch_indices",
           "local_slice"]
