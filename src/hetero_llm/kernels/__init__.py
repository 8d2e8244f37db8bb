"""Fused kernels. Each op has a torch reference beside its fast path."""
from .rms_norm import rms_norm, rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref"]
