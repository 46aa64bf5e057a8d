"""Memory and step-time planning of rCM training layouts (tools/plan_memory.py, pretrain_rcm's
pre-flight check). ``layout``: what is planned; ``params`` / ``activations``: bytes counted from
the model code; ``memory`` / ``step_time``: a layout's per-GPU plan; ``search``: layouts that fit;
``measure``: the measurements the tests validate the counts with."""

from rcm_megatron import lazy_exports

# name -> submodule, imported on first use (see rcm_megatron.lazy_exports)
_EXPORTS = {
    "Layout": ".layout",
    "Workload": ".layout",
    "MemoryAssumptions": ".memory",
    "plan_memory": ".memory",
    "check_fits": ".search",
    "fitting_layouts": ".search",
    "TimeAssumptions": ".step_time",
    "step_seconds": ".step_time",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["Layout", "Workload", "MemoryAssumptions", "TimeAssumptions", "plan_memory", "step_seconds",
           "check_fits", "fitting_layouts"]
