"""The shard pass: cut a planned model down to what this rank of a torchrun job runs."""
from __future__ import annotations

import gc

from dataclasses import replace

from torch import nn

from ..integrations.transformers import map_roles, spec_by_family
from ..planner.parallel import mlp_unit
from ..planner.plan import Plan
from .comm import ParallelContext, init_parallel
from .layout import tensor_layout
from .pipeline import EmbeddingStandIn, LogitsStandIn, SkippedLayer, split_pipeline
from .tensor import shard_tensor_parallel

_STAND_INS = (SkippedLayer, EmbeddingStandIn, LogitsStandIn, nn.Identity)


def join_job(plan: Plan) -> tuple[ParallelContext, Plan]:
    """This process's place in the torchrun job the plan asks for (joining it if needed), and
    rank 0's plan: ranks that planned on their own could differ (measured costs are noisy),
    and every rank must cut the model the same way."""
    par = plan.parallel
    ctx = init_parallel(par.tp, par.pp, par.timeout_s, "cuda" if plan.device == "cuda" else "cpu")
    agreed = Plan.from_json(ctx.agree(plan.to_json(indent=None)))
    return ctx, agreed


def shard_pass(model: nn.Module, plan: Plan, ctx: ParallelContext) -> list[tuple[str, str, str]]:
    """Pipeline stage first (drops the layers other stages run), then the tensor-parallel
    slices of what is left. The freed weights are released before returning."""
    spec = spec_by_family(plan.family)
    par = plan.parallel
    swaps = []
    if par.pp > 1:
        swaps += split_pipeline(model, spec, par.ranks[ctx.rank].layers, ctx, par.micro_batches)
    if par.tp > 1:
        modules = dict(model.named_modules())
        roles = {n: r for n, r in map_roles(model, spec).roles.items()
                 if not isinstance(modules[n], _STAND_INS)}
        lay = tensor_layout(model, spec, par.tp, par.vocab_parallel, mlp_unit({e.name: e for e in plan.entries}))
        swaps += shard_tensor_parallel(model, spec, roles, lay, ctx)
    model.hetero_parallel = ctx
    gc.collect()
    return swaps


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
