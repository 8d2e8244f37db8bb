"""The quantize pass: swap every linear the plan quantizes for an Int8Linear."""
from __future__ import annotations

from torch import nn

from .._modules import replace_module
from ..planner.plan import Plan
from .modules import Int8Linear, linear_weight
from .primitives import check_finite


def check_quantizable(model: nn.Module, plan: Plan) -> None:
    """Fail before changing anything: a NaN/inf weight would leave a half-converted model."""
    for e in plan.by_action("quantize"):
        check_finite(linear_weight(model.get_submodule(e.name)), e.name)


def quantize_pass(model: nn.Module, plan: Plan) -> list[tuple[str, str, str]]:
    """Quantize in place; returns (module, old type, new type) for each swap."""
    swaps = []
    for e in plan.by_action("quantize"):
        old = model.get_submodule(e.name)
        backend = e.kernel.split("+", 1)[0]
        new = Int8Linear.from_linear(old, e.quant, backend=backend, name=e.name)
        replace_module(model, e.name, new)
        swaps.append((e.name, type(old).__name__, type(new).__name__))
    return swaps
