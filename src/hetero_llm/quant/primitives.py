"""INT8 quantization primitives with their torch references.

Weights are quantized per output channel (row of a (out, in) weight):
symmetric  w ~= q * scale,               q in [-127, 127]
asymmetric w ~= (q - zero_point) * scale, q in [-128, 127]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NonFiniteWeightError

QMIN_SYM, QMAX_SYM = -127, 127  # -128 is left out so the range is symmetric
QMIN_ASYM, QMAX_ASYM = -128, 127


@dataclass
class QuantizedWeight:
    """Integer weight (out, in) int8, fp32 scale (out,), optional int32 zero point (out,)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None


def check_finite(weight: torch.Tensor, name: str) -> None:
    """NaN or inf in a weight cannot be quantized; say which module holds it."""
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise NonFiniteWeightError(
            f"{name}: the weight holds {bad} NaN/inf value(s), so it cannot be quantized. Fix the "
            "checkpoint, or leave this module in floating point with quantize='none'.")


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16-representable value >= x (x positive, fp32), returned in fp32."""
    down = x.to(torch.bfloat16)
    # For positive floats the next representable value up is the next bit pattern.
    up = (down.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(down.float() < x, up, down).float()


def _safe_scale(span: torch.Tensor, levels: float) -> torch.Tensor:
    """Scale = span / levels, in fp32, rounded up to a bf16-representable value.

    Computed in fp64 so rows spanning fp32's whole range do not overflow. An
    all-zero row has span 0: any scale reproduces it exactly, so it gets 1.0
    rather than a tiny number whose reciprocal would overflow. Rounding up to
    bf16 lets bf16 kernels apply the scale exactly; rounding up (not to
    nearest) keeps the row's extremes inside the integer range.
    """
    scale = (span.double() / levels).clamp(max=torch.finfo(torch.float32).max).float()
    scale = torch.where(span > 0, scale, torch.ones_like(scale))
    tiny = torch.finfo(torch.bfloat16).tiny
    return _bf16_at_least(scale.clamp(min=tiny))


def quantize_symmetric(weight: torch.Tensor, name: str = "weight") -> QuantizedWeight:
    """Per-output-channel symmetric INT8."""
    check_finite(weight, name)
    w = weight.detach().to(torch.float32)
    scale = _safe_scale(w.abs().amax(dim=1), float(QMAX_SYM))
    q = torch.round(w / scale[:, None]).clamp_(QMIN_SYM, QMAX_SYM).to(torch.int8)
    return QuantizedWeight(q.contiguous(), scale.contiguous())


def quantize_asymmetric(weight: torch.Tensor, name: str = "weight") -> QuantizedWeight:
    """Per-output-channel asymmetric INT8 with an integer zero point."""
    check_finite(weight, name)
    w = weight.detach().to(torch.float32)
    # The range must contain 0 so that zero stays exactly representable.
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    span = hi.double() - lo.double()
    scale = _safe_scale(span, float(QMAX_ASYM - QMIN_ASYM))
    zero_point = (QMIN_ASYM - torch.round(lo / scale)).clamp_(QMIN_ASYM, QMAX_ASYM).to(torch.int32)
    # An all-zero row: zero point 0 keeps q = 0, so no kernel has to cancel terms.
    zero_point = torch.where(span > 0, zero_point, torch.zeros_like(zero_point))
    q = (torch.round(w / scale[:, None]) + zero_point[:, None]).clamp_(QMIN_ASYM, QMAX_ASYM)
    return QuantizedWeight(q.to(torch.int8).contiguous(), scale.contiguous(), zero_point.contiguous())


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization, computed in fp32."""
    q = qw.qweight.to(torch.float32)
    if qw.zero_point is not None:
        q = q - qw.zero_point.to(torch.float32)[:, None]
    return (q * qw.scale[:, None]).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's accuracy measure)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
