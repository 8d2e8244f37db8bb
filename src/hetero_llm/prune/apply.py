"""The prune pass: the first pass of the data flow. Reads the plan, changes the model in place.

Masks (magnitude, Wanda, N:M) zero weights in the float model, so the quantization that follows
stores exact zeros. Structured pruning removes channels and KV groups and updates the config.
Wanda-style ranking measures each decoder layer on the outputs of the already-pruned layers
before it (prune/sequential.py); a global threshold needs every score at once, so scope="global"
measures the dense model in one pass instead.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import NonFiniteWeightError
from ..integrations.transformers import spec_by_family
from ..plan import Plan
from ..quant.calibrate import activation_stats
from ..quant.modules import linear_weight
from .masks import global_threshold, layer_mask, magnitude_scores, mask_label, nm_mask, reconstruct, wanda_scores
from .report import PruneReport, sparsity_report
from .sequential import prune_layer_by_layer
from .structured import out_projections, plan_shrink, shrink_layer, update_config


def prune_config(plan: Plan) -> PruneConfig:
    return PruneConfig.from_dict(plan.options.get("prune", {}))


def mask_targets(plan: Plan) -> list[str]:
    """The linears the plan masks (magnitude / wanda)."""
    return [e.name for e in plan.entries if e.prune and not e.prune.startswith("structured")]


def _scores(module: nn.Module, cfg: PruneConfig, stats: dict, name: str) -> torch.Tensor:
    w = linear_weight(module)
    return wanda_scores(w, stats[name]) if cfg.method == "wanda" else magnitude_scores(w)


@torch.no_grad()
def _apply_masks(model: nn.Module, names: list[str], cfg: PruneConfig, stats: dict) -> None:
    modules = {n: model.get_submodule(n) for n in names}
    threshold = None
    if cfg.scope == "global" and modules:
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
        if cfg.reconstruct:
            w.copy_(reconstruct(w, keep, stats[name]))  # writes through a Conv1D's transposed view too
        else:
            w.mul_(keep.to(w.dtype))  # a Conv1D's (out, in) view writes through to its (in, out) storage


def share_statistics(stats: dict, ctx) -> dict:
    """Every rank of a job prunes with rank 0's statistics, so all cut the same weights."""
    if ctx is None:
        return stats
    nccl = torch.distributed.get_backend(ctx.world_group) == "nccl"  # NCCL moves only GPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return {n: ctx.broadcast(t.to(device), 0).cpu() for n, t in sorted(stats.items())}


def _in_layer(names: list[str], layers_path: str, index: int) -> list[str]:
    prefix = f"{layers_path}.{index}."
    return [n for n in names if n.startswith(prefix)]


def _structured(model: nn.Module, plan: Plan, cfg: PruneConfig, data: Any, ctx) -> None:
    spec = spec_by_family(plan.family)
    shrink = plan_shrink(model, spec, cfg)
    layers = model.get_submodule(spec.layers)
    if cfg.criterion == "wanda":
        prune_layer_by_layer(model, layers, lambda i: out_projections(spec, shrink, i), data,
                             lambda i, stats: shrink_layer(model, spec, i, shrink, share_statistics(stats, ctx)),
                             statistic="gram" if cfg.reconstruct else "sum_of_squares")
    else:
        for i in range(len(layers)):
            shrink_layer(model, spec, i, shrink, {})
    update_config(model, spec, shrink)


def _masks(model: nn.Module, plan: Plan, cfg: PruneConfig, data: Any, ctx) -> None:
    targets = mask_targets(plan)
    spec = spec_by_family(plan.family)
    if cfg.method != "wanda":
        _apply_masks(model, targets, cfg, {})
        return
    rest, statistic = targets, "gram" if cfg.reconstruct else "sum_of_squares"
    if spec is not None and cfg.scope == "layer":
        layers = model.get_submodule(spec.layers)
        prune_layer_by_layer(model, layers, lambda i: _in_layer(targets, spec.layers, i), data,
                             lambda i, stats: _apply_masks(model, _in_layer(targets, spec.layers, i), cfg,
                                                           share_statistics(stats, ctx)), statistic=statistic)
        rest = [n for n in targets if not n.startswith(spec.layers + ".")]
    if rest:  # global scope, an unknown architecture, or the lm_head: measured in one pass
        stats = share_statistics(activation_stats(model, rest, data, statistic), ctx)
        _apply_masks(model, rest, cfg, stats)


def prune_pass(model: nn.Module, plan: Plan, calibration_data: Any = None, ctx=None) -> PruneReport | None:
    """Apply the plan's pruning in place; returns (and attaches as `model.hetero_prune`) the
    per-layer report. Modules keep their types: nothing is swapped. `ctx`: the torchrun job,
    whose ranks all prune with rank 0's calibration statistics."""
    cfg = prune_config(plan)
    if cfg.method == "none":
        return None
    pruned = {e.name for e in plan.entries if e.prune}
    names = [n for n, _ in model.named_modules() if n in pruned]
    _check_finite(model, names)
    before = sum(linear_weight(model.get_submodule(n)).numel() for n in names)
    if cfg.method == "structured":
        _structured(model, plan, cfg, calibration_data, ctx)
    else:
        _masks(model, plan, cfg, calibration_data, ctx)
    model.hetero_prune = sparsity_report(model, names, method=describe(cfg), params_before=before)
    return model.hetero_prune


def _check_finite(model: nn.Module, names: list[str]) -> None:
    """NaN/inf weights cannot be ranked (nor re-fitted): refuse before anything is cut."""
    for name in names:
        w = linear_weight(model.get_submodule(name))
        if not torch.isfinite(w).all():
            raise NonFiniteWeightError(
                f"{name}: the weight holds {int((~torch.isfinite(w)).sum())} NaN/inf value(s), so its weights "
                "cannot be ranked for pruning. Fix the checkpoint; the model was not changed.")


def describe(cfg: PruneConfig) -> str:
    """The report's name for the pruning: the plan's label for masks."""
    if cfg.method == "structured":
        return f"structured (mlp {cfg.mlp:g}, heads {cfg.heads:g}, {cfg.criterion}" + \
            (", least-squares update)" if cfg.reconstruct else ")")
    return mask_label(cfg)
