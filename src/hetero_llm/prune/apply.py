"""The prune pass: the first pass of the data flow. Reads the plan, changes the model in place.

Masks (magnitude, Wanda, N:M) zero weights in the float model, so quantization that follows
stores exact zeros. Structured pruning removes channels and heads and updates the config.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import InvalidOptionError
from ..integrations.transformers import spec_by_family
from ..planner.plan import Plan
from ..quant.modules import linear_weight
from .masks import global_threshold, layer_mask, magnitude_scores, nm_mask, wanda_scores
from .report import PruneReport, sparsity_report
from .structured import out_projections, plan_shrink, shrink_model


def prune_config(plan: Plan) -> PruneConfig:
    return PruneConfig.from_dict(plan.options.get("prune", {}))


def mask_targets(plan: Plan) -> list[str]:
    """The linears the plan masks (magnitude / wanda)."""
    return [e.name for e in plan.entries if e.prune and not e.prune.startswith("structured")]


def calibration_targets(model: nn.Module, plan: Plan) -> list[str]:
    """Modules whose input norms pruning needs (empty: no calibration)."""
    cfg = prune_config(plan)
    if not cfg.needs_calibration:
        return []
    if cfg.method == "structured":
        spec = spec_by_family(plan.family)
        return out_projections(model, spec, plan_shrink(model, spec, cfg))
    return mask_targets(plan)


def _scores(module: nn.Module, cfg: PruneConfig, stats: dict, name: str) -> torch.Tensor:
    w = linear_weight(module)
    if cfg.method == "wanda":
        return wanda_scores(w, stats[name])
    return magnitude_scores(w)


@torch.no_grad()
def _apply_masks(model: nn.Module, names: list[str], cfg: PruneConfig, stats: dict) -> None:
    modules = {n: model.get_submodule(n) for n in names}
    threshold = None
    if cfg.scope == "global":
        fns = [lambda n=n, m=m: _scores(m, cfg, stats, n) for n, m in modules.items()]
        total = sum(linear_weight(m).numel() for m in modules.values())
        threshold = global_threshold(fns, total, cfg.sparsity)
    for name, m in modules.items():
        scores = _scores(m, cfg, stats, name)
        if cfg.nm is not None:
            keep = nm_mask(scores, *cfg.nm)
        elif threshold is not None:
            keep = scores >= threshold
        else:  # Wanda compares weights within each output row (its paper's choice); magnitude per layer
            keep = layer_mask(scores, cfg.sparsity, per_row=cfg.method == "wanda")
        w = linear_weight(m)
        w.mul_(keep.to(w.dtype))  # a Conv1D's (out, in) view writes through to its (in, out) storage


def share_statistics(stats: dict, ctx) -> dict:
    """Every rank of a job prunes with rank 0's statistics, so all cut the same weights."""
    if ctx is None:
        return stats
    nccl = torch.distributed.get_backend(ctx.world_group) == "nccl"  # NCCL moves only GPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return {n: ctx.broadcast(t.to(device), 0).cpu() for n, t in sorted(stats.items())}


def prune_pass(model: nn.Module, plan: Plan, stats: dict | None = None) -> PruneReport | None:
    """Apply the plan's pruning in place; returns (and attaches as `model.hetero_prune`) the
    per-layer report. Modules keep their types: nothing is swapped."""
    cfg = prune_config(plan)
    if cfg.method == "none":
        return None
    stats = stats or {}
    if cfg.needs_calibration and not stats:
        raise InvalidOptionError("this pruning ranks weights by calibration activations and got none; "
                                 "pass calibration_data.")
    pruned = {e.name for e in plan.entries if e.prune}
    names = [n for n, _ in model.named_modules() if n in pruned]
    before = sum(linear_weight(model.get_submodule(n)).numel() for n in names)
    if cfg.method == "structured":
        spec = spec_by_family(plan.family)
        shrink_model(model, spec, plan_shrink(model, spec, cfg), stats)
    else:
        _apply_masks(model, mask_targets(plan), cfg, stats)
    model.hetero_prune = sparsity_report(model, names, method=describe(cfg), params_before=before)
    return model.hetero_prune


def describe(cfg: PruneConfig) -> str:
    if cfg.method == "structured":
        return f"structured (mlp {cfg.mlp:g}, heads {cfg.heads:g}, {cfg.criterion})"
    shape = cfg.pattern if cfg.nm else f"{100 * cfg.sparsity:g}% {cfg.scope}"
    return f"{cfg.method} {shape}"
