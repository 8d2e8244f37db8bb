"""Applying a plan to a model: every pass, in the order of the data flow.

accelerate() checks the model and the plan, then calls `apply_plan`; measuring this machine
(measure.py) applies plans to tiny models the same way, without the checks (it builds them).

prune -> calibrate -> quantize -> (tp/pp: cut to this rank, wire the reductions) -> then the
passes of PASSES on the rank's part. A meta-device model read from a checkpoint is first cut
to this rank's part, filled from the file, then quantized (row-parallel scale statistics
reduced over the ranks).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .decode import decode_pass
from .kernels.apply import kernels_pass
from .parallel.checkpoint import load_shard
from .parallel.placement import attach_placement, place_pass
from .parallel.shard import cut_pass, local_plan, stat_reducer, wire_pass
from .planner import Plan
from .prune.apply import prune_pass
from .prune.semi_sparse import semi_sparse_pass
from .quant.apply import calibrated_modules, check_quantizable, compute_dtype_pass, quantize_pass
from .quant.calibrate import activation_absmax

# After quantizing and sharding, in this order. "sparse" (2:4 weights the plan puts on sparse
# tensor cores) comes after "kernels": it needs the weights on their GPU, and "kernels" has
# concatenated q/k/v and gate/up, whose fused weight it converts. "decode" binds generate() and
# forward() on the instance last, once every module is in place.
PASSES = (("compute_dtype", compute_dtype_pass), ("place", place_pass), ("kernels", kernels_pass),
          ("sparse", semi_sparse_pass), ("decode", decode_pass))


def apply_plan(model: nn.Module, plan: Plan, *, ctx: Any = None, calibration_data: Any = None,
               checkpoint: Any = None) -> nn.Module:
    """Apply `plan` to `model` in place and return it, with `hetero_plan` and `hetero_replaced`
    attached. `ctx`: this rank's job (tp/pp), or None; `checkpoint`: where a meta model's
    weights are read from."""
    if checkpoint is not None:
        replaced = _from_checkpoint(model, plan, ctx, checkpoint)
    else:
        prune_pass(model, plan, calibration_data, ctx)
        names = calibrated_modules(plan)  # W8A8 smoothing/outliers: statistics of the pruned model
        act_absmax = activation_absmax(model, names, calibration_data) if names else None
        replaced = list(quantize_pass(model, plan, act_absmax))
        if ctx is not None:
            replaced.extend(cut_pass(model, plan, ctx))
            wire_pass(model, plan, ctx)
    applied = local_plan(model, plan) if ctx is not None else plan
    for _, apply_pass in PASSES:
        replaced.extend(apply_pass(model, applied) or [])
    model.eval()  # modules the passes created start in training mode
    attach_placement(model)  # boundary hooks of a multi-device plan, after the kernels pass swapped modules
    model.hetero_plan = plan
    model.hetero_replaced = replaced
    return model


def _from_checkpoint(model: nn.Module, plan: Plan, ctx: Any, checkpoint: Any) -> list:
    replaced = cut_pass(model, plan, ctx) if ctx is not None else []
    load_shard(model, checkpoint)
    applied = local_plan(model, plan) if ctx is not None else plan
    check_quantizable(model, applied)
    replaced.extend(quantize_pass(model, applied, None, stat_reducer(plan, ctx) if ctx is not None else None))
    if ctx is not None:
        wire_pass(model, plan, ctx)
    return replaced
