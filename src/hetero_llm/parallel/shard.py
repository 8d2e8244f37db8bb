"""The shard pass: cut a planned model down to what this rank of a torchrun job runs."""
from __future__ import annotations

import gc

from dataclasses import replace

from torch import nn

from ..integrations.transformers import map_roles, spec_by_family
from ..plan import Plan
from .comm import ParallelContext, init_parallel
from .layout import mlp_unit_of, tensor_layout
from .pipeline import EmbeddingStandIn, LogitsStandIn, SkippedLayer, split_pipeline
from .layout import TensorLayout
from .tensor import slice_tensor_parallel, wire_tensor_parallel

_STAND_INS = (SkippedLayer, EmbeddingStandIn, LogitsStandIn, nn.Identity)


def join_job(plan: Plan) -> tuple[ParallelContext, Plan]:
    """This process's place in the torchrun job the plan asks for (joining it if needed), and
    rank 0's plan: ranks that planned on their own could differ (measured costs are noisy),
    and every rank must cut the model the same way."""
    par = plan.parallel
    ctx = init_parallel(par.tp, par.pp, par.timeout_s, "cuda" if plan.device == "cuda" else "cpu")
    agreed = Plan.from_json(ctx.agree(plan.to_json(indent=None)))
    return ctx, agreed


def _roles(model: nn.Module, spec) -> dict[str, str]:
    modules = dict(model.named_modules())
    return {n: r for n, r in map_roles(model, spec).roles.items() if not isinstance(modules[n], _STAND_INS)}


def _layout(model: nn.Module, plan: Plan) -> TensorLayout | None:
    par = plan.parallel
    if par.tp == 1:
        return None
    spec = spec_by_family(plan.family)
    return tensor_layout(model, spec, par.tp, par.vocab_parallel, mlp_unit_of({e.name: e for e in plan.entries}))


def cut_pass(model: nn.Module, plan: Plan, ctx: ParallelContext) -> list[tuple[str, str, str]]:
    """Pipeline stage first (drops the layers other stages run), then the tensor-parallel
    slices of what is left. Works on meta models (nothing is read until parallel/checkpoint.py)."""
    spec = spec_by_family(plan.family)
    par = plan.parallel
    lay = _layout(model, plan)  # from the whole model's shapes, before the stand-ins replace parts
    swaps = []
    if par.pp > 1:
        swaps += split_pipeline(model, spec, par.ranks[ctx.rank].layers, ctx, par.micro_batches)
    if lay is not None:
        swaps += slice_tensor_parallel(model, spec, _roles(model, spec), lay, ctx.tp_rank)
    model.hetero_parallel = ctx
    model.__dict__["_hetero_layout"] = lay
    gc.collect()  # release the weights this rank no longer holds
    return swaps


def wire_pass(model: nn.Module, plan: Plan, ctx: ParallelContext) -> None:
    """The tensor-parallel messages, on the final modules (after quantization)."""
    lay = model.__dict__.pop("_hetero_layout", None)
    if lay is not None:
        wire_tensor_parallel(model, _roles(model, spec_by_family(plan.family)), lay, ctx)


def stat_reducer(plan: Plan, ctx: ParallelContext):
    """For quantizing after slicing: which modules' scale statistics must be reduced over the
    tp ranks so they equal the unsliced model's (row-parallel weights; per-tensor scales)."""
    if plan.parallel.tp == 1:
        return None
    shards = {e.name: (e.shard, e.quant or "") for e in plan.entries}

    def reducer_for(name: str):
        shard, quant = shards.get(name, (None, ""))
        per_tensor = quant.endswith(":tensor") and shard in ("column", "row", "vocab")
        return ctx.reduce_stat if shard == "row" or per_tensor else None
    return reducer_for


def local_plan(model: nn.Module, plan: Plan) -> Plan:
    """The part of the plan this rank applies: the modules it still holds after the shard pass
    (a pipeline stage drops the other stages' layers; `model.hetero_plan` keeps the whole plan)."""
    modules = dict(model.named_modules())

    def held(name: str) -> bool:
        m = modules.get(name)
        return m is not None and not isinstance(m, _STAND_INS)
    entries = tuple(e for e in plan.entries if held(e.name))
    fusions = tuple(f for f in plan.fusions if held(f.name) and all(held(m) for m in f.members))
    return replace(plan, entries=entries, fusions=fusions)
