"""Pruning decisions: which linears get masks, which 2:4 ones run on sparse tensor cores, and
what structured pruning leaves.

The prune pass (prune/apply.py) and the semi-sparse pass (prune/semi_sparse.py) read these
entries; nothing here touches the model. Masked weights stay dense on CPU (a zero costs as much
as any weight to a dense kernel), so the entry's predicted time is unchanged. On a GPU of compute
capability 8.0+, a 2:4-pruned fp16/bf16 linear is stored as torch's semi-structured sparse
tensor where the cost model predicts that faster than dense (large batches; batch-1 decode is
slower with the 2:4 kernels), and its kernel becomes SPARSE_KERNEL. Structured pruning is planned
on the pruned architecture itself (a meta-device copy), so its entries, sizes and predictions
are the smaller model's.
"""
from __future__ import annotations

from dataclasses import replace

from ..config import PruneConfig
from ..errors import InvalidOptionError
from ..hardware import Hardware
from ..prune.masks import mask_label
from ..prune.semi_sparse import (SPARSE_DTYPES, SPARSE_KERNEL, SPARSE_MIN_CAPABILITY, SPARSE_MIN_COLS,
                                  SPARSE_MIN_ROWS)
from ..prune.structured import ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT, Shrink
from .cost import CostModel
from ..plan import PlanEntry
from .predict import quant_bytes
from .profile import ModuleProfile

# Linears inside decoder layers ("linear": the generic role of an unknown architecture's Linear).
MASKED_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc_in", "fc_out", "linear")


def _maskable(p: ModuleProfile, cfg: PruneConfig, tied: set[str], output: str | None) -> bool:
    if p.role == "lm_head" or p.name == output:  # an unknown architecture's output layer has role "linear"
        if cfg.lm_head and p.name in tied:
            raise InvalidOptionError(
                f"{p.name} shares its weight with the token embedding, so pruning it would prune the embedding "
                "too; keep PruneConfig(lm_head=False) for this model.")
        return cfg.lm_head
    return p.role in MASKED_ROLES


def output_layer(profiles: list[ModuleProfile]) -> str | None:
    """The output projection: the lm_head by role, else (no role table) the last linear, which
    produces the logits in a causal LM."""
    linears = [p for p in profiles if p.kind == "linear"]
    by_role = [p.name for p in linears if p.role == "lm_head"]
    return by_role[0] if by_role else (linears[-1].name if linears else None)


def mark_pruning(entries: dict[str, PlanEntry], profiles: list[ModuleProfile], cfg: PruneConfig,
                 tied: set[str], shrink: Shrink | None, *, hardware: Hardware | None = None,
                 cm: CostModel | None = None, tp: int = 1) -> list[str]:
    """Set each pruned entry's `prune` in place (and, for 2:4 on a GPU, its kernel: sparse tensor
    cores or dense, see choose_semi_sparse); returns notes for the plan. `hardware`, `cm`: the
    plan's machine and cost model (without them, 2:4 zeros are stored dense); `tp`: tensor-parallel
    degree."""
    if cfg.method == "none":
        return []
    if cfg.method == "structured":
        return _mark_structured(entries, profiles, shrink)
    label, skipped = mask_label(cfg), []
    output = output_layer(profiles)
    for p in profiles:
        if p.kind != "linear" or p.name not in entries or not _maskable(p, cfg, tied, output):
            continue
        if cfg.nm is not None and p.in_features % cfg.nm[1]:
            skipped.append(p.name)
            continue
        entries[p.name] = replace(entries[p.name], prune=label)
    storage = "the zeros are stored dense (same speed on CPU; smaller only when compressed)"
    if cm is not None and cm.device == "cuda" and cfg.nm is not None:
        storage = choose_semi_sparse(entries, profiles, [n for n, e in entries.items() if e.prune == label],
                                     cfg, hardware, cm, tp)
    notes = [f"pruning: {label} of every decoder linear{' and the lm_head' if cfg.lm_head else ''}; {storage}"]
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


# -- 2:4 on sparse tensor cores -----------------------------------------------------------------

# Cost of a 2:4 matmul, relative to torch's dense one on the same GPU table (planner/cost.py).
# Estimates from the format and published kernel speedups, NOT measured on a GPU here:
SPARSE_BYTES = 0.5625  # values: 1/2 of the dense bytes; metadata: 2-bit indices of the 2 kept of every
#                        4 values = 1/16 of the fp16/bf16 bytes
SPARSE_MATH_GAIN = 1.5  # half the FLOPs, but large 2:4 GEMMs reach ~1.3-1.6x over dense, not 2x
SPARSE_SMALL_M_BW = 0.5  # at a few rows the 2:4 GEMM (tiled for GEMMs, its input padded) streams the
SPARSE_FULL_M = 256  # weight at ~half a dense GEMV's bandwidth, rising linearly to the dense kernel's
#                      at this many rows: so batch-1 decode reads 0.5625 / 0.5 = 1.125x the dense time
# and pays one extra small op (cm.add_us(): torch pads and transposes around the 2:4 GEMM).
SPARSE_MIN_GAIN = 1.1  # chosen only when predicted this much faster: the constants are unmeasured


def sparse_linear_us(p: ModuleProfile, cm: CostModel) -> float:
    """One decode step (cm.batch rows) through linear `p` with a 2:4 semi-structured weight."""
    c = cm.linear_cost("torch", None, p.dtype)
    rows, params = cm.batch, p.in_features * p.out_features
    bandwidth = c.bandwidth(params) * min(1.0, SPARSE_SMALL_M_BW + (1 - SPARSE_SMALL_M_BW) * rows / SPARSE_FULL_M)
    call = c.call_us + cm.add_us()
    t_mem = call + SPARSE_BYTES * quant_bytes(p, None) / (bandwidth * 1e3)
    t_math = call + 2.0 * rows * params / (c.throughput(rows) * 1e3) / SPARSE_MATH_GAIN
    return max(t_mem, t_math)


def _matmul_groups(entries: dict[str, PlanEntry], names: list[str]) -> list[list[str]]:
    """Entries computed by one matmul: a fused group (q/k/v, gate/up: same parent and fused kind,
    so they share one concatenated weight) or a single linear."""
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        kind = entries[n].kernel.partition("+fused:")[2]
        groups.setdefault((n.rpartition(".")[0], kind) if kind else (n, ""), []).append(n)
    return list(groups.values())


def _machine_refusal(cfg: PruneConfig, hardware: Hardware | None, tp: int) -> str | None:
    if cfg.nm != (2, 4):
        return f"sparse tensor cores run the 2:4 pattern only, not {cfg.pattern}"
    if hardware is None or not hardware.gpus:
        return "no CUDA GPU described"
    cc = min(tuple(g.compute_capability) for g in hardware.gpus)
    if cc < SPARSE_MIN_CAPABILITY:
        return f"sm_{cc[0]}{cc[1]} has no sparse tensor cores (compute capability 8.0+)"
    if tp > 1:
        return "tensor parallelism slices the weights; 2:4 sparse tensors are not sharded"
    return None


def _entry_refusal(e: PlanEntry, p: ModuleProfile) -> str | None:
    if e.action == "quantize" or e.quant not in (None, "none"):
        return f"{e.quant} weights (the 2:4 sparse tensors here are fp16/bf16)"
    if e.kernel == "triton-linear_add":
        return "the residual add runs in this matmul's epilogue (Triton linear_add), which reads a dense weight"
    if e.action != "keep":
        return f"{e.kernel} reads a dense weight"
    if p.module_type != "Linear":
        return f"a {p.module_type}, not an nn.Linear"
    if p.dtype not in SPARSE_DTYPES:
        return f"{p.dtype} weights (2:4 sparse tensor cores take float16/bfloat16)"
    return None


def _group_choice(group: list[ModuleProfile], cm: CostModel) -> tuple[bool, float, str]:
    """(sparse?, sparse/dense time ratio, why) for one matmul."""
    rows, cols = sum(p.out_features for p in group), group[0].in_features
    if rows % SPARSE_MIN_ROWS or cols % SPARSE_MIN_COLS:
        return False, 1.0, (f"weight {rows}x{cols}: torch's 2:4 tensors need rows a multiple of "
                            f"{SPARSE_MIN_ROWS} and columns of {SPARSE_MIN_COLS}")
    fused = replace(group[0], out_features=rows, params=rows * cols)
    dense = cm.linear_us(fused, "torch", None, quant_bytes(fused, None))
    sparse = sparse_linear_us(fused, cm)
    what = f"{sparse:.0f} µs vs {dense:.0f} µs dense at batch {cm.batch}" + (
        f", fused {rows}x{cols} weight" if len(group) > 1 else "")
    if sparse * SPARSE_MIN_GAIN > dense:
        return False, 1.0, f"2:4 sparse tensor cores not predicted {SPARSE_MIN_GAIN:g}x faster ({what})"
    return True, sparse / dense, f"2:4 sparse tensor cores: predicted {what}"


def choose_semi_sparse(entries: dict[str, PlanEntry], profiles: list[ModuleProfile], names: list[str],
                       cfg: PruneConfig, hardware: Hardware | None, cm: CostModel, tp: int = 1) -> str:
    """Per N:M-pruned GPU linear (`names`), sparse tensor cores or dense zeros, in place: the kernel
    becomes SPARSE_KERNEL (keeping a "+fused:" suffix) and decode_us_after the 2:4 prediction, or
    the reason gets "dense: why". Returns the plan note's storage clause."""
    by_name = {p.name: p for p in profiles}
    machine = _machine_refusal(cfg, hardware, tp)
    chosen, reasons = 0, []
    for group in _matmul_groups(entries, names):
        es, ps = [entries[n] for n in group], [by_name[n] for n in group]
        why = machine or next((r for r in map(_entry_refusal, es, ps) if r), None)
        sparse, ratio = False, 1.0
        if why is None:
            sparse, ratio, why = _group_choice(ps, cm)
        for e in es:
            if sparse:
                base = e.kernel.split("+", 1)[0]
                entries[e.name] = replace(e, kernel=SPARSE_KERNEL + e.kernel[len(base):], reason=f"{e.reason}; {why}",
                                          decode_us_after=e.decode_us_after * ratio)
            else:
                entries[e.name] = replace(e, reason=f"{e.reason}; dense: {why}" if e.reason else f"dense: {why}")
        chosen += len(group) if sparse else 0
        reasons += [] if sparse else [why]
    if chosen:
        return (f"{chosen} of {len(names)} use 2:4 sparse tensor cores (values and metadata: {SPARSE_BYTES:.0%} of "
                f"the bytes, half the FLOPs; predicted faster at batch {cm.batch}), the rest store the "
                "zeros dense")
    return f"the zeros are stored dense: {reasons[0] if reasons else 'nothing to convert'}"
