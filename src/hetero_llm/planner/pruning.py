"""Pruning decisions: which linears get masks, and what structured pruning leaves.

The prune pass (prune/apply.py) reads these entries; nothing here touches the model.
Masked weights stay dense on CPU (a zero costs as much as any weight to a dense kernel), so
the entry's predicted time is unchanged; structured pruning is planned on the pruned
architecture itself (a meta-device copy), so its entries, sizes and predictions are the
smaller model's.
"""
from __future__ import annotations

from dataclasses import replace

from ..config import PruneConfig
from ..errors import InvalidOptionError
from ..prune.structured import ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT, Shrink
from .plan import PlanEntry
from .profile import ModuleProfile

# Linears inside decoder layers ("linear": the generic role of an unknown architecture's Linear).
MASKED_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc_in", "fc_out", "linear")


def _mask_label(cfg: PruneConfig) -> str:
    if cfg.nm is not None:
        return f"{cfg.method} {cfg.pattern}"
    where = "global" if cfg.scope == "global" else ("per row" if cfg.method == "wanda" else "per layer")
    return f"{cfg.method} {100 * cfg.sparsity:g}% {where}"


def _maskable(p: ModuleProfile, cfg: PruneConfig, tied: set[str]) -> bool:
    if p.role == "lm_head":
        if cfg.lm_head and p.name in tied:
            raise InvalidOptionError(
                f"{p.name} shares its weight with the token embedding, so pruning it would prune the embedding "
                "too; keep PruneConfig(lm_head=False) for this model.")
        return cfg.lm_head
    return p.role in MASKED_ROLES


def mark_pruning(entries: dict[str, PlanEntry], profiles: list[ModuleProfile], cfg: PruneConfig,
                 tied: set[str], shrink: Shrink | None) -> list[str]:
    """Set each pruned entry's `prune` in place; returns notes for the plan."""
    if cfg.method == "none":
        return []
    if cfg.method == "structured":
        return _mark_structured(entries, profiles, shrink)
    label, skipped = _mask_label(cfg), []
    for p in profiles:
        if p.kind != "linear" or p.name not in entries or not _maskable(p, cfg, tied):
            continue
        if cfg.nm is not None and p.in_features % cfg.nm[1]:
            skipped.append(p.name)
            continue
        entries[p.name] = replace(entries[p.name], prune=label)
    notes = [f"pruning: {label} of every decoder linear{' and the lm_head' if cfg.lm_head else ''}; "
             "the zeros are stored dense (same speed on CPU; smaller only when compressed)"]
    if skipped:
        notes.append(f"{len(skipped)} linears not pruned: their input size is not a multiple of "
                     f"{cfg.nm[1]} (first: {skipped[0]})")  # type: ignore[index]
    return notes


def _mark_structured(entries: dict[str, PlanEntry], profiles: list[ModuleProfile], shrink: Shrink | None) -> list[str]:
    assert shrink is not None
    mlp = f"structured: {shrink.mlp[1]} of {shrink.mlp[0]} MLP channels"
    attn = f"structured: {shrink.kv_heads[1]} of {shrink.kv_heads[0]} KV groups"
    for p in profiles:
        label = None
        if p.role in MLP_IN + MLP_OUT and shrink.mlp[1] != shrink.mlp[0]:
            label = mlp
        elif p.role in ATTN_IN + ATTN_OUT and shrink.changes_attention:
            label = attn
        if label and p.name in entries:
            entries[p.name] = replace(entries[p.name], prune=label)
    note = f"structured pruning: MLP {shrink.mlp[0]} → {shrink.mlp[1]} channels per layer"
    if shrink.changes_attention:
        note += (f", KV heads {shrink.kv_heads[0]} → {shrink.kv_heads[1]} (query heads {shrink.heads[0]} → "
                 f"{shrink.heads[1]})")
    return [note + "; the plan describes the pruned model"]
