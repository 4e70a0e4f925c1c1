"""offloadlab: simulate and measure layer offload for LLM serving.

The shared vocabulary lives here (``specs``, ``catalog``, ``policy``, ``profile``, ``trace``);
``offloadlab.sim`` is the SimPy simulator. Units inside are seconds and bytes.
"""
from .catalog import get_gpu, get_model, gpu_names, load_catalog_file, model_names
from .errors import ConfigError, DoesNotFitError, OffloadLabError, UnknownNameError
from .policy import NoOffload, Placement, Prefetch, VllmCopy, VllmUva, interval, parse_policy
from .profile import Profile
from .specs import HardwareSpec, ModelSpec
from .trace import Span, Trace

__version__ = "0.1.0"
