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


def _safe_scale(span: torch.Tensor, levels: float) -> torch.Tensor:
    # An all-zero row has span 0: any scale reproduces it exactly, so use 1.0
    # rather than a tiny number whose reciprocal would overflow.
    scale = span / levels
    scale = torch.where(span > 0, scale, torch.ones_like(scale))
    # Scales are rounded to bf16-representable values (kept in fp32), so bf16
    # kernels apply them exactly; the weight is quantized against the rounded
    # scale, so this costs no accuracy (a largest value landing at 127.5 is
    # clamped, an error no larger than ordinary rounding). A span so small that
    # bf16 rounds it to 0 is not possible: bf16 has fp32's exponent range.
    return scale.to(torch.bfloat16).to(torch.float32)


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
    scale = _safe_scale(hi - lo, float(QMAX_ASYM - QMIN_ASYM))
    zero_point = (QMIN_ASYM - torch.round(lo / scale)).clamp_(QMIN_ASYM, QMAX_ASYM).to(torch.int32)
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
