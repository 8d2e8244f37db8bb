"""Applying a plan to a model: one list of passes, in the order of the data flow.

accelerate() (a model in memory, or a meta model read from a checkpoint slice by slice), load()
(a meta skeleton filled from a saved file) and the measuring of tiny models (measure.py) all
call `apply_plan`; what differs between them is in the `PassContext`, and a pass with nothing
to do for a context does nothing:

    read       a meta model from `checkpoint`: with tp/pp cut to this rank's part first, so it
               reads only its slice
    prune      unstructured, N:M or structured pruning (Wanda with the calibration data)
    calibrate  activation statistics for W8A8 smoothing / outlier channels (on the pruned model)
    quantize   INT8 modules from the float weights; for load() empty ones, filled below
    shard      tp/pp: cut to this rank's part (unless "read" did) and wire the reductions
    kernels    fused modules (q/k/v and gate/up concatenated, norms, decoder-layer forwards)
    fill       load(): the saved tensors into the rebuilt modules
    compute_dtype, place, sparse, decode
               the model's working dtype, its devices, 2:4 weights on sparse tensor cores
               (after "place": they need their GPU), generate()/forward() bound last

Every pass is `(model, plan, ctx) -> [(module name, old type, what was done), ...]`; the list
of all of them becomes `model.hetero_replaced`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .decode import decode_pass
from .fused.apply import kernels_pass
from .parallel.checkpoint import load_shard
from .parallel.placement import attach_placement, place_pass
from .parallel.shard import cut_pass, local_plan, stat_reducer, wire_pass
from .plan import Plan
from .prune.apply import prune_pass
from .prune.semi_sparse import semi_sparse_pass
from .quant.apply import (calibrated_modules, check_quantizable, compute_dtype_pass, empty_quantize_pass,
                          quantize_pass)
from .quant.calibrate import activation_absmax


@dataclass
class PassContext:
    """What the passes share besides the model and the plan."""

    calibration_data: Any = None  # token batches for Wanda and W8A8 calibration
    job: Any = None  # this rank's tp/pp job (parallel.shard.ParallelContext); None in one process
    checkpoint: Any = None  # where a meta model's weights are read from (accelerate(checkpoint=))
    fill: Callable[[nn.Module], None] | None = None  # load(): puts the saved tensors in the skeleton
    act_absmax: dict | None = None  # set by "calibrate"
    cut: bool = False  # set once this rank's part has been cut out
    # The plan's entries for the modules this rank holds, taken once its part is cut (before the
    # kernels pass renames modules); the plan itself in one process.
    applied: Plan | None = None


def _read(model: nn.Module, plan: Plan, ctx: PassContext) -> list:
    if ctx.checkpoint is None:
        return []
    replaced = cut_pass(model, plan, ctx.job) if ctx.job is not None else []
    ctx.cut = ctx.job is not None
    load_shard(model, ctx.checkpoint)
    ctx.applied = local_plan(model, plan) if ctx.cut else plan
    check_quantizable(model, ctx.applied)
    return replaced


def _prune(model: nn.Module, plan: Plan, ctx: PassContext) -> list:
    if ctx.fill is None:
        prune_pass(model, plan, ctx.calibration_data, ctx.job)
    return []


def _calibrate(model: nn.Module, plan: Plan, ctx: PassContext) -> list:
    names = calibrated_modules(plan) if ctx.fill is None else []
    ctx.act_absmax = activation_absmax(model, names, ctx.calibration_data) if names else None
    return []


def _quantize(model: nn.Module, plan: Plan, ctx: PassContext) -> list:
    if ctx.fill is not None:
        return empty_quantize_pass(model, plan)
    if ctx.cut:  # read slice by slice: row-parallel scale statistics reduced over the ranks
        return quantize_pass(model, ctx.applied, None, stat_reducer(plan, ctx.job))
    return quantize_pass(model, plan, ctx.act_absmax)


def _shard(model: nn.Module, plan: Plan, ctx: PassContext) -> list:
    if ctx.job is None:
        ctx.applied = plan
        return []
    replaced = [] if ctx.cut else cut_pass(model, plan, ctx.job)
    ctx.cut = True
    wire_pass(model, plan, ctx.job)
    ctx.applied = local_plan(model, plan)
    return replaced


def _fill(model: nn.Module, plan: Plan, ctx: PassContext) -> list:
    if ctx.fill is not None:
        ctx.fill(model)
    return []


def _on_local_plan(run: Callable[[nn.Module, Plan], Any]) -> Callable[[nn.Module, Plan, PassContext], list]:
    """A pass that reads only the plan's entries for what this rank holds."""
    return lambda model, plan, ctx: run(model, ctx.applied) or []


PASSES = (("read", _read), ("prune", _prune), ("calibrate", _calibrate), ("quantize", _quantize),
          ("shard", _shard), ("kernels", _on_local_plan(kernels_pass)), ("fill", _fill),
          ("compute_dtype", _on_local_plan(compute_dtype_pass)), ("place", _on_local_plan(place_pass)),
          ("sparse", _on_local_plan(semi_sparse_pass)), ("decode", _on_local_plan(decode_pass)))


def apply_plan(model: nn.Module, plan: Plan, ctx: PassContext | None = None) -> nn.Module:
    """Apply `plan` to `model` in place and return it, with `hetero_plan` and `hetero_replaced`."""
    ctx = ctx or PassContext()
    replaced = []
    for _, run in PASSES:
        replaced.extend(run(model, plan, ctx))
    model.eval()  # modules the passes created start in training mode
    attach_placement(model)  # boundary hooks of a multi-device plan, after the kernels pass swapped modules
    model.hetero_plan = plan
    model.hetero_replaced = replaced
    return model
