"""Planning tensor/pipeline parallelism: who holds what, and what it is predicted to cost.

The slices come from parallel/layout.py (pure functions of the model's shapes), so the plan
shows exactly what each rank will hold. Each entry's `shard` says how that module is split
("column", "row", "vocab") or "replicated"; `Plan.parallel` lists the ranks.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ..config import Options
from ..errors import UnsupportedArchitectureError
from ..integrations.transformers import ArchitectureSpec
from ..parallel.layout import ROW_ROLES, TensorLayout, mlp_unit_of, role_shard, stage_ranges, tensor_layout
from ..plan import ParallelPlan, PlanEntry, Prediction, RankShare
from .predict import entry_weight_bytes
from .profile import ModuleProfile

# One all-reduce of a decode step's activations (latency-bound): gloo over loopback on a CPU
# (~1 ms measured with two 1-thread ranks on the 2-core reference machine, benchmarks/cpu_parallel.py),
# NCCL over NVLink on GPUs. One point-to-point send between pipeline stages costs about as much.
ALLREDUCE_US = {"cpu": 1000.0, "cuda": 15.0}


def _layer_index(name: str, spec: ArchitectureSpec) -> int | None:
    prefix = spec.layers + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def _holds(e: PlanEntry, spec: ArchitectureSpec, share_layers: tuple[int, int], stage: int, pp: int) -> bool:
    """Whether a rank of `stage` holds this module at all (pipeline split)."""
    index = _layer_index(e.name, spec)
    if index is not None:
        return share_layers[0] <= index < share_layers[1]
    if e.role in ("embed", "pos_embed"):
        return stage == 0
    return stage == pp - 1  # final norm, lm_head


def _fraction(e: PlanEntry, lay: TensorLayout, rank: int) -> float:
    shard = role_shard(e.role, lay)
    if shard is None:
        return 1.0
    total = sum(shard.size(r) for r in range(lay.tp))
    return shard.size(rank) / total


def check_parallel(spec: ArchitectureSpec | None) -> None:
    if spec is None:
        raise UnsupportedArchitectureError(
            "tp/pp > 1 splits a model by its role table (which linear is q, o, down...), and this model "
            "has none. Use tp=1, pp=1, or a supported architecture.")


def parallel_entries(entries: dict[str, PlanEntry], lay: TensorLayout | None) -> dict[str, PlanEntry]:
    """Label each entry with its split; row-parallel layers stay weight-only INT8 (a W8A8 one
    would quantize a different slice of the activations on each rank)."""
    out = {}
    for name, e in entries.items():
        shard = role_shard(e.role, lay) if lay is not None else None
        kind = shard.kind if shard else ("heads" if e.role == "attention" and lay is not None else "replicated")
        changes: dict[str, Any] = {"shard": kind}
        if e.quant == "w8a8" and e.role in ROW_ROLES and lay is not None:
            changes.update(quant="int8", kernel="auto",
                           reason=e.reason + "; weight-only INT8: row-parallel under tp")
        out[name] = replace(e, **changes)
    return out


def plan_parallel(model: nn.Module, spec: ArchitectureSpec, entries: dict[str, PlanEntry],
                  profiles: list[ModuleProfile], tied: set[str], options: Options, device: str,
                  prediction: Prediction) -> tuple[dict[str, PlanEntry], ParallelPlan, Prediction, list[str]]:
    """Slices per rank, labelled entries, per-rank weights and the predicted step time."""
    pl = options.placement
    tp, pp = pl.tp, pl.pp
    lay = tensor_layout(model, spec, tp, pl.vocab_parallel, mlp_unit_of(entries)) if tp > 1 else None
    entries = parallel_entries(entries, lay)
    n_layers = len(model.get_submodule(spec.layers))
    stages = stage_ranges(n_layers, pp)
    by_name = {p.name: p for p in profiles}
    shares_embed = any(e.action == "quantize" and e.role == "embed" for e in entries.values())
    ranks, step_us = [], []
    for rank in range(tp * pp):
        stage, tp_rank = divmod(rank, tp)
        held = [e for e in entries.values() if _holds(e, spec, stages[stage], stage, pp)]
        frac = {e.name: _fraction(e, lay, tp_rank) if lay else 1.0 for e in held}
        weight = sum(entry_weight_bytes(by_name[e.name], e, shares_embed, e.name in tied) * frac[e.name]
                     for e in held if e.name in by_name)
        step_us.append(sum(e.decode_us_after * frac[e.name] for e in held))
        heads = lay.split.q[tp_rank] if lay else (0, 0)
        kv = lay.split.kv[tp_rank] if lay else (0, 0)
        mlp = lay.mlp[tp_rank] if lay else (0, 0)
        vocab = lay.vocab_ranges[tp_rank] if lay and lay.vocab_ranges else None
        ranks.append(RankShare(rank, stage, tp_rank, stages[stage], heads, kv, mlp, vocab, weight / 2**20))
    par = ParallelPlan(tp, pp, pl.vocab_parallel, pl.micro_batches, pl.timeout_s, tuple(ranks),
                       prediction.weight_mb_after)
    comm = ALLREDUCE_US["cuda" if device == "cuda" else "cpu"]
    # Decode at batch 1: the stages run one after another; within a stage the tp ranks run
    # at once, each paying two all-reduces per layer (and the vocab exchange).
    per_step = sum(max(step_us[s * tp:(s + 1) * tp]) for s in range(pp))
    rest = prediction.decode_ms_after * 1e3 - sum(e.decode_us_after for e in entries.values())
    messages = (2 * n_layers + (2 if lay and lay.vocab_ranges else 0)) * comm * (tp > 1) + pp * comm * (pp > 1)
    after_ms = (per_step + rest + messages) / 1e3
    pred = replace(prediction, decode_ms_after=after_ms, weight_mb_after=max(r.weight_mb for r in ranks))
    notes = [f"tp={tp} x pp={pp}: {tp * pp} ranks, largest holds {pred.weight_mb_after:.1f} MB of weights "
             f"({pred.weight_mb_after / max(prediction.weight_mb_after, 1e-9):.2f}x one process); predicted "
             f"{prediction.decode_ms_after / after_ms:.2f}x one process's decode step"]
    if tp > 1 and pp == 1 and pl.vocab_parallel is False:
        notes.append("embedding and lm_head replicated on every rank (vocab_parallel=False)")
    return entries, par, pred, notes

