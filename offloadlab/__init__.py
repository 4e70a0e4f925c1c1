"""offloadlab: simulate and measure layer offload for LLM serving.

This package's own modules are the vocabulary floor, importing nothing else of the project:
``specs``, ``catalog``, ``policy``, ``schedule``, ``profile``, ``trace``, ``checks``, ``errors``,
``fileio``, ``metrics``, ``hf_config``, ``vllm_flags``. On them stand ``offloadlab.sim`` (the SimPy
simulator), ``offloadlab.runtime`` (torch) and ``offloadlab.validation``; ``offloadlab.apps`` (CLI,
sweeps, optimizer, study, paper, plots) sits on top. Units inside are seconds and bytes.
"""
from .catalog import get_gpu, get_model, gpu_names, load_catalog_file, model_names
from .errors import ConfigError, DoesNotFitError, OffloadLabError, UnknownNameError
from .policy import NoOffload, Placement, Prefetch, VllmCopy, VllmUva, interval, parse_policy
from .profile import Profile
from .specs import HardwareSpec, ModelSpec
from .trace import Span, Trace

__version__ = "0.1.0"
