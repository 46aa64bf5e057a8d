"""Memory and step-time planning of rCM training layouts (tools/plan_memory.py, pretrain_rcm's
pre-flight check). ``layout``: what is planned; ``params`` / ``activations``: bytes counted from
the model code; ``memory`` / ``step_time``: a layout's per-GPU plan; ``search``: layouts that fit;
``measure``: the measurements the tests validate the counts with."""

from .layout import Layout, Workload
from .memory import MemoryAssumptions, plan_memory
from .search import check_fits, fitting_layouts
from .step_time import TimeAssumptions, step_seconds

__all__ = ["Layout", "Workload", "MemoryAssumptions", "TimeAssumptions", "plan_memory", "step_seconds",
           "check_fits", "fitting_layouts"]
