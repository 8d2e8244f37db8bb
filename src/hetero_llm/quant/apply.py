"""The quantize pass: swap every module the plan quantizes for its INT8 version."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .._modules import replace_module
from ..plan import Plan, PlanEntry
from .calibrate import outlier_channels, smoothing_factors
from .embedding import Int8Embedding, TiedInt8Linear
from .backends import usable_backend
from .modules import Int8Linear, linear_weight
from .primitives import check_finite, reduce_statistics
from .schemes import QuantSpec
from .w8a8 import W8A8Linear
from .w8a8 import pick_backend as w8a8_pick


def _weight_of(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, nn.Embedding) else linear_weight(module)


def check_quantizable(model: nn.Module, plan: Plan) -> None:
    """Fail before changing anything: a NaN/inf weight would leave a half-converted model."""
    for e in plan.by_action("quantize"):
        check_finite(_weight_of(model.get_submodule(e.name)), e.name)


def calibrated_modules(plan: Plan) -> list[str]:
    """The linears whose input activations W8A8 calibration must observe."""
    q = plan.options.get("quantize", {})
    if not (q.get("smooth_alpha", 0) > 0 or q.get("outlier_channels", 0) > 0):
        return []
    return [e.name for e in plan.by_action("quantize") if e.quant == "w8a8"]


def _w8a8_inputs(plan: Plan, originals: dict[str, nn.Module],
                 act_absmax: dict[str, torch.Tensor] | None) -> dict[str, tuple]:
    """(smooth multiplier on x, fp outlier channels) per W8A8 linear.

    Linears fused into one matmul (q/k/v, gate/up) read the same input, so they
    share one smoothing vector, computed from their weights jointly.
    """
    names = calibrated_modules(plan)
    if not names:
        return {}
    q = plan.options["quantize"]
    alpha, n_out = float(q.get("smooth_alpha", 0.0)), int(q.get("outlier_channels", 0))
    group_of = {m: f.members for f in plan.fusions for m in f.members}
    result = {}
    for name in names:
        group = [m for m in group_of.get(name, (name,)) if m in act_absmax and m in originals]
        act = torch.stack([act_absmax[m] for m in group]).amax(dim=0)
        w_max = torch.stack([linear_weight(originals[m]).detach().abs().amax(dim=0).float().cpu()
                             for m in group]).amax(dim=0)
        s = smoothing_factors(act, w_max, alpha) if alpha > 0 else torch.ones_like(act)
        smooth = (1.0 / s) if alpha > 0 else None
        result[name] = (smooth, outlier_channels(act / s, n_out))
    return result


def _quantize_linear(e: PlanEntry, old: nn.Module, new_embeddings: dict[int, Int8Embedding],
                     w8a8: dict[str, tuple]) -> nn.Module:
    backend = e.kernel.split("+", 1)[0]
    tied = new_embeddings.get(id(linear_weight(old))) if isinstance(old, nn.Linear) else None
    if tied is not None and e.quant == "int8" and getattr(old, "bias", None) is None:
        return TiedInt8Linear(tied, backend)
    if QuantSpec.parse(e.quant).activations:
        smooth, outliers = w8a8.get(e.name, (None, None))
        w = linear_weight(old)
        return W8A8Linear.from_weight(w, getattr(old, "bias", None), smooth=None if smooth is None else
                                      smooth.to(w.device), outliers=outliers, backend=backend, name=e.name)
    return Int8Linear.from_linear(old, e.quant, backend=backend, name=e.name)


def _embeddings_first(model: nn.Module, plan: Plan) -> list[tuple[PlanEntry, nn.Module]]:
    """(entry, original module) to quantize; embeddings first, so a tied lm_head can share them."""
    pairs = [(e, model.get_submodule(e.name)) for e in plan.by_action("quantize")]
    return sorted(pairs, key=lambda pair: not isinstance(pair[1], nn.Embedding))


def quantize_pass(model: nn.Module, plan: Plan, act_absmax: dict[str, torch.Tensor] | None = None,
                  reducer_for: Callable[[str], Callable | None] | None = None) -> list[tuple[str, str, str]]:
    """Quantize in place; returns (module, old type, new type) for each swap.

    `act_absmax` (from calibrate.activation_absmax) is needed for W8A8 with
    smoothing or outlier channels. `reducer_for(name)`: for a model already sliced over
    tensor-parallel ranks, the function that reduces that module's scale statistics over
    the ranks (primitives.reduce_statistics), or None.
    """
    if calibrated_modules(plan) and act_absmax is None:
        raise ValueError("this plan's W8A8 layers need calibration statistics")  # api.py always passes them
    ordered = _embeddings_first(model, plan)
    w8a8 = _w8a8_inputs(plan, {e.name: old for e, old in ordered}, act_absmax)
    swaps, new_embeddings = [], {}
    for e, old in ordered:
        reducer = reducer_for(e.name) if reducer_for is not None else None
        with reduce_statistics(reducer) if reducer is not None else contextlib.nullcontext():
            if isinstance(old, nn.Embedding):
                new = Int8Embedding.from_embedding(old, e.name)
                new_embeddings[id(old.weight)] = new
            else:
                new = _quantize_linear(e, old, new_embeddings, w8a8)
        replace_module(model, e.name, new)
        swaps.append((e.name, type(old).__name__, type(new).__name__))
    return swaps


def _empty_module(e: PlanEntry, old: nn.Module, plan: Plan, new_embeddings: dict) -> nn.Module:
    """The module quantize_pass would build, with the right shapes and no data (for load())."""
    device = torch.device(plan.device)
    meta = torch.device("meta")
    if isinstance(old, nn.Embedding):
        new = Int8Embedding.shaped_like(old, device=meta)
        new_embeddings[id(old.weight)] = new
        return new
    w = linear_weight(old)
    out_f, in_f = w.shape
    has_bias = getattr(old, "bias", None) is not None
    tied = new_embeddings.get(id(w)) if isinstance(old, nn.Linear) else None
    if tied is not None and e.quant == "int8" and not has_bias:
        return TiedInt8Linear(tied, e.kernel.split("+", 1)[0], device=device)
    spec = QuantSpec.parse(e.quant)
    backend = e.kernel.split("+", 1)[0]
    if spec.activations:
        q = plan.options["quantize"]
        n_out = min(int(q.get("outlier_channels", 0)), in_f)
        return W8A8Linear(in_f, out_f, bias=has_bias, n_outliers=n_out, smooth=q.get("smooth_alpha", 0) > 0,
                          backend=w8a8_pick(in_f, device, backend), device=meta)
    group = spec.group_size if spec.granularity == "group" else None
    chosen = usable_backend(in_f, device, backend, group, spec.asymmetric)
    return Int8Linear(in_f, out_f, bias=has_bias, asymmetric=spec.asymmetric, backend=chosen, device=meta,
                      group_size=group, scheme=e.quant)


def empty_quantize_pass(model: nn.Module, plan: Plan) -> list[tuple[str, str, str]]:
    """quantize_pass's module swaps without computing anything: load() fills them from a file."""
    swaps, new_embeddings = [], {}
    for e, old in _embeddings_first(model, plan):
        new = _empty_module(e, old, plan, new_embeddings)
        replace_module(model, e.name, new)
        swaps.append((e.name, type(old).__name__, type(new).__name__))
    return swaps


def compute_dtype_pass(model: nn.Module, plan: Plan) -> list:
    """Cast what is left in float to the plan's compute dtype (planner.precision): after the
    quantize pass, so the INT8 weights are already out of the way. INT8 modules keep their int8
    tensors and fp32 scales through the cast."""
    name = plan.model_settings.get("compute_dtype")
    if name is None:
        return []
    dtype = getattr(torch, name)
    if all(t.dtype == dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()):
        return []
    model.to(dtype)
    return [("compute_dtype", type(model).__name__, f"floating tensors cast to {name}")]
