"""Typed errors. Every refusal says what went wrong and what to do instead."""
from __future__ import annotations


class HeteroLLMError(Exception):
    """Base class of every error hetero_llm raises on purpose."""


class NotAModelError(HeteroLLMError, TypeError):
    """The object given is not a transformers model (a torch.nn.Module with a config)."""


class UnsupportedArchitectureError(HeteroLLMError):
    """The model's architecture has no role table and strict=True was asked for."""


class MetaDeviceError(HeteroLLMError):
    """Weights live on the meta device, so there is nothing to quantize or run."""


class ForeignQuantizationError(HeteroLLMError):
    """The model was already quantized by another library (bitsandbytes, torchao, GGUF, ...)."""


class InvalidOptionError(HeteroLLMError, ValueError):
    """An option has a value we do not know, or a combination that cannot work."""


class AlreadyAcceleratedError(HeteroLLMError):
    """accelerate() was called again on a model with a different plan."""


class PlanMismatchError(HeteroLLMError):
    """A plan does not describe this model (module names or shapes differ)."""


class HardwareError(HeteroLLMError):
    """The requested hardware profile or device does not exist or cannot be used."""


class ModelLoadError(HeteroLLMError):
    """A model or checkpoint could not be found or read."""


class NonFiniteWeightError(HeteroLLMError, ValueError):
    """A weight holds NaN or inf, so it cannot be quantized."""


class DistributedError(HeteroLLMError, RuntimeError):
    """A tensor/pipeline-parallel job cannot go on: it was launched wrongly, or another rank
    died, raised or stopped answering within the timeout."""


class ExportError(HeteroLLMError):
    """A model cannot be exported (or an export cannot be written or run) as asked."""


class TritonSetupError(HeteroLLMError, RuntimeError):
    """PyTriton is missing, or this Python environment cannot host Triton's Python stub."""


class SelfCheckError(HeteroLLMError):
    """A module hetero_llm would swap in does not reproduce transformers' own on the installed
    transformers release (checked on a tiny model of the same config before anything changes).
    `parts` names what differed."""

    def __init__(self, message: str, parts: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.parts = tuple(parts)


class AccuracyError(HeteroLLMError):
    """An accelerated model's output is not the original's (quantize="none": tokens differ; INT8:
    agreement under the floor), so its speed figures are not reported as speedups."""


class HeteroLLMWarning(UserWarning):
    """Something was changed or skipped that the user should know about."""
