"""rcm-megatron: model-parallel rCM distillation of Wan2.1 video diffusion transformers."""

__version__ = "0.1.0"
