"""INT8 quantization primitives with their torch references.

Weights (out, in) are quantized per output channel (one scale per row), per
group (one scale per `group_size` consecutive inputs of a row) or per tensor:
symmetric  w ~= q * scale,               q in [-127, 127]
asymmetric w ~= (q - zero_point) * scale, q in [-128, 127]
Activations are quantized dynamically, symmetric, one scale per token (row).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import InvalidOptionError, NonFiniteWeightError

QMIN_SYM, QMAX_SYM = -127, 127  # -128 is left out so the range is symmetric
QMIN_ASYM, QMAX_ASYM = -128, 127


GRANULARITIES = ("channel", "group", "tensor")

# fn(stat, op) -> stat, op "max" or "min": combines a weight's statistics over the ranks that
# each hold part of its rows (see reduce_statistics). None: the weight is whole here.
_STAT_REDUCER: contextvars.ContextVar[Callable[[torch.Tensor, str], torch.Tensor] | None] = \
    contextvars.ContextVar("hetero_llm_stat_reducer", default=None)


@contextlib.contextmanager
def reduce_statistics(fn: Callable[[torch.Tensor, str], torch.Tensor]) -> Iterator[None]:
    """Within this block, per-channel and per-tensor ranges are reduced with `fn(stat, op)`
    (op "max" or "min"; it reduces `stat` in place across ranks and returns it) before the
    scales are computed.

    For a row-parallel weight quantized after slicing: each rank holds part of every row, and
    the row's scale must be the one of the whole row, or ranks would quantize the same row
    differently from an unsliced model. Enter it only around weights cut along their inputs
    (or per-tensor weights cut either way): reducing per-row statistics of rows that differ
    between ranks would mix unrelated rows. Per-group statistics are never reduced: shard
    boundaries fall on group boundaries (parallel/layout.py), so every group is whole on one
    rank. Every rank of the group must quantize the same weights in the same order.
    """
    token = _STAT_REDUCER.set(fn)
    try:
        yield
    finally:
        _STAT_REDUCER.reset(token)


def _reduced(stat: torch.Tensor, op: str, per_group: bool) -> torch.Tensor:
    fn = _STAT_REDUCER.get()
    return stat if fn is None or per_group else fn(stat.contiguous(), op)


@dataclass
class QuantizedWeight:
    """Integer weight (out, in) int8; fp32 scale and optional int32 zero point.

    scale/zero_point are (out,) per channel (a per-tensor weight repeats its
    one value on every row, so every per-channel kernel runs it) or
    (out, in // group_size) per group.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None

    @property
    def group_size(self) -> int | None:
        return None if self.scale.dim() == 1 else self.qweight.shape[1] // self.scale.shape[1]


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


def _grouped(w: torch.Tensor, group_size: int | None, per_tensor: bool) -> torch.Tensor:
    """View w (out, in) as (out, groups, size): the last dim is what one scale covers."""
    out_f, in_f = w.shape
    if per_tensor:
        return w.reshape(1, 1, -1)
    if group_size is None:
        return w.reshape(out_f, 1, in_f)
    if group_size < 1 or in_f % group_size:
        raise InvalidOptionError(f"group_size={group_size} must be positive and divide in_features={in_f}; "
                                 "pick a divisor (64 or 128 usually) or use per-channel scales.")
    return w.reshape(out_f, in_f // group_size, group_size)


def _scale_shape(scale: torch.Tensor, out_f: int, group_size: int | None, per_tensor: bool) -> torch.Tensor:
    if per_tensor:
        return scale.reshape(1).expand(out_f).contiguous()
    return scale.reshape(out_f) if group_size is None else scale.contiguous()


def quantize_symmetric(weight: torch.Tensor, name: str = "weight", *, group_size: int | None = None,
                       per_tensor: bool = False) -> QuantizedWeight:
    """Symmetric INT8, per output channel (default), per group or per tensor."""
    check_finite(weight, name)
    w = _grouped(weight.detach().to(torch.float32), group_size, per_tensor)
    absmax = _reduced(w.abs().amax(dim=2), "max", group_size is not None and not per_tensor)
    scale = _safe_scale(absmax, float(QMAX_SYM))  # (out|1, groups|1)
    q = torch.round(w / scale[..., None]).clamp_(QMIN_SYM, QMAX_SYM).to(torch.int8)
    return QuantizedWeight(q.reshape(weight.shape).contiguous(),
                           _scale_shape(scale, weight.shape[0], group_size, per_tensor))


def quantize_asymmetric(weight: torch.Tensor, name: str = "weight", *, group_size: int | None = None,
                        per_tensor: bool = False) -> QuantizedWeight:
    """Asymmetric INT8 with an integer zero point, per channel, per group or per tensor."""
    check_finite(weight, name)
    w = _grouped(weight.detach().to(torch.float32), group_size, per_tensor)
    # The range must contain 0 so that zero stays exactly representable.
    per_group = group_size is not None and not per_tensor
    lo = _reduced(w.amin(dim=2).clamp(max=0.0), "min", per_group)
    hi = _reduced(w.amax(dim=2).clamp(min=0.0), "max", per_group)
    span = hi.double() - lo.double()
    scale = _safe_scale(span, float(QMAX_ASYM - QMIN_ASYM))
    zero_point = (QMIN_ASYM - torch.round(lo / scale)).clamp_(QMIN_ASYM, QMAX_ASYM).to(torch.int32)
    # An all-zero row: zero point 0 keeps q = 0, so no kernel has to cancel terms.
    zero_point = torch.where(span > 0, zero_point, torch.zeros_like(zero_point))
    q = (torch.round(w / scale[..., None]) + zero_point[..., None]).clamp_(QMIN_ASYM, QMAX_ASYM)
    out_f = weight.shape[0]
    return QuantizedWeight(q.to(torch.int8).reshape(weight.shape).contiguous(),
                           _scale_shape(scale, out_f, group_size, per_tensor),
                           _scale_shape(zero_point, out_f, group_size, per_tensor))


def quantize_weight(weight: torch.Tensor, name: str = "weight", *, asymmetric: bool = False,
                    granularity: str = "channel", group_size: int = 128) -> QuantizedWeight:
    """The one entry point the modules use: scheme and granularity as options."""
    if granularity not in GRANULARITIES:
        raise InvalidOptionError(f"granularity={granularity!r}; choose one of {GRANULARITIES}")
    fn = quantize_asymmetric if asymmetric else quantize_symmetric
    return fn(weight, name, group_size=group_size if granularity == "group" else None,
              per_tensor=granularity == "tensor")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 per row of x (..., K): returns (q int8, scale fp32 (..., 1)).

    Reference for the activation side of W8A8. An all-zero row gets scale 1
    (q = 0); the scale is computed in fp32 whatever x's dtype, and the ratio
    is clamped so huge finite inputs cannot produce inf.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX_SYM, torch.ones_like(amax))
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(xf / scale).clamp_(QMIN_SYM, QMAX_SYM).to(torch.int8)
    return q, scale


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization, computed in fp32."""
    out_f, in_f = qw.qweight.shape
    groups = 1 if qw.scale.dim() == 1 else qw.scale.shape[1]
    q = qw.qweight.to(torch.float32).reshape(out_f, groups, in_f // groups)
    scale = qw.scale.reshape(out_f, groups, 1)
    if qw.zero_point is not None:
        q = q - qw.zero_point.to(torch.float32).reshape(out_f, groups, 1)
    return (q * scale).reshape(out_f, in_f).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's accuracy measure)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
