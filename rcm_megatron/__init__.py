"""rcm-megatron: model-parallel rCM distillation of Wan2.1 video diffusion transformers."""

import importlib

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for a subpackage whose names ``{name: submodule}`` are
    imported on first use (PEP 562): importing a light submodule (``models.config`` for the flag
    parser) does not import the heavy ones beside it (``models.wan`` pulls in torch._dynamo), so
    a process that exits on a bad flag, or a tool that needs only part of a package, starts
    seconds sooner. ``from package import name`` works as before."""

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
