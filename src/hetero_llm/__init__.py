"""hetero_llm: make a transformers model infer faster with one call.

    import hetero_llm
    model = hetero_llm.accelerate(model)
    print(model.hetero_plan)
"""
from ._version import __version__
from .api import accelerate, plan
from .config import KernelConfig, Options, PlacementConfig, PruneConfig, QuantConfig
from .errors import (AccuracyError, AlreadyAcceleratedError, DistributedError, ExportError, ForeignQuantizationError, HardwareError,
                     HeteroLLMError, HeteroLLMWarning, InvalidOptionError, MetaDeviceError, ModelLoadError,
                     NonFiniteWeightError, NotAModelError, PlanMismatchError, SelfCheckError, TritonSetupError,
                     UnsupportedArchitectureError)
from .export import export_onnx
from .hardware import Hardware, hardware_profile, inspect_hardware
from .planner import Plan, PlanEntry
from .serialize import load, save
from .integrations.hf_adapter import warn_if_untested as _warn_if_untested

_warn_if_untested()

__all__ = [
    "__version__", "accelerate", "plan", "save", "load", "inspect_hardware", "hardware_profile", "Hardware", "Plan",
    "PlanEntry", "QuantConfig", "PruneConfig", "KernelConfig", "PlacementConfig", "Options",
    "HeteroLLMError", "HeteroLLMWarning", "NotAModelError", "UnsupportedArchitectureError",
    "MetaDeviceError", "ForeignQuantizationError", "InvalidOptionError", "AlreadyAcceleratedError",
    "PlanMismatchError", "HardwareError", "ModelLoadError", "NonFiniteWeightError", "DistributedError",
    "ExportError", "TritonSetupError", "SelfCheckError", "AccuracyError", "export_onnx",
]
