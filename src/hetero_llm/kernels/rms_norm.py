"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, in one torch op where possible.

`rms_norm_ref` is the reference (the formula transformers' Llama uses);
`rms_norm` runs torch's fused `F.rms_norm` for fp32 inputs and falls back to the
reference for lower precisions, whose rounding order transformers defines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: normalize in fp32, cast back, then scale (Llama's order)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm on the torch path."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_ref(x, weight, eps)
