"""Quantization scheme names as they appear in a plan entry's `quant` field.

One short string per module, readable in a table and parseable back:
  "int8"          symmetric weights, one scale per output channel, fp activations (W8A16)
  "int8-asym"     the same with a zero point per channel
  "int8:g128"     one scale (and zero point) per 128 inputs of a row
  "int8:tensor"   one scale for the whole weight
  "w8a8"          symmetric per-channel weights, activations quantized per token at run time
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidOptionError


@dataclass(frozen=True)
class QuantSpec:
    asymmetric: bool = False
    granularity: str = "channel"  # channel | group | tensor
    group_size: int = 128
    activations: bool = False  # True: W8A8, activations quantized per token

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        if text == "w8a8":
            return cls(activations=True)
        base, colon, detail = text.partition(":")
        if base not in ("int8", "int8-asym"):
            raise InvalidOptionError(f"unknown quantization {text!r}; expected int8, int8-asym (optionally "
                                     "with :g<size> or :tensor) or w8a8")
        asym = base == "int8-asym"
        if not colon:
            return cls(asymmetric=asym)
        if detail == "tensor":
            return cls(asymmetric=asym, granularity="tensor")
        size = detail[1:]
        if detail.startswith("g") and size.isascii() and size.isdigit() and int(size) > 0:
            return cls(asymmetric=asym, granularity="group", group_size=int(detail[1:]))
        raise InvalidOptionError(f"unknown granularity {detail!r} in {text!r}; use :g<size> or :tensor")

    def __str__(self) -> str:
        if self.activations:
            return "w8a8"
        base = "int8-asym" if self.asymmetric else "int8"
        if self.granularity == "group":
            return f"{base}:g{self.group_size}"
        return f"{base}:tensor" if self.granularity == "tensor" else base

    def describe(self) -> str:
        if self.activations:
            return "int8 weights per channel x int8 activations per token (W8A8)"
        kind = "asym" if self.asymmetric else "sym"
        where = {"channel": "per channel", "tensor": "per tensor",
                 "group": f"per group of {self.group_size}"}[self.granularity]
        return f"int8 {kind} {where}, weight-only (W8A16)"


def spec_for_options(scheme: str, granularity: str, group_size: int) -> QuantSpec:
    """The spec a QuantConfig asks for (scheme already resolved from "auto")."""
    if scheme == "w8a8":
        return QuantSpec(activations=True)
    return QuantSpec(asymmetric=scheme == "int8-asym", granularity=granularity, group_size=group_size)
