"""Which slice of which weight each rank holds: pure functions of the model's shapes.

Tensor parallel (Megatron-style): q/k/v and gate/up (fc_in) are split over their outputs
(column-parallel, no communication); o and down (fc_out) over their inputs (row-parallel,
one all-reduce of the output; the bias is added by one rank only). Attention is split by
whole KV groups: a rank holds some KV heads and exactly the query heads that read them,
so every rank runs ordinary attention on its heads. With vocab_parallel the embedding and
lm_head are split over the vocabulary. Pipeline parallel gives each stage a contiguous run
of layers. Everything here is computed from module shapes, so it works on meta models and
the planner and the passes agree on the same slices.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import InvalidOptionError
from ..integrations.transformers import ArchitectureSpec, block_sizes
from ..plan import PlanEntry
from ..quant.schemes import QuantSpec

Range = tuple[int, int]

COLUMN_ROLES = ("q", "k", "v", "qkv", "gate", "up", "gate_up", "fc_in")
ROW_ROLES = ("o", "down", "fc_out")


def even_ranges(n: int, parts: int, unit: int = 1) -> list[Range]:
    """Split n (a multiple of `unit`) into `parts` contiguous ranges whose sizes differ by at
    most one unit, larger ones first."""
    units = n // unit
    base, extra = divmod(units, parts)
    out, start = [], 0
    for p in range(parts):
        size = (base + (1 if p < extra else 0)) * unit
        out.append((start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class HeadSplit:
    """Per tp rank: its query heads and KV heads (ranges of head indices)."""

    q: tuple[Range, ...]
    kv: tuple[Range, ...]


def head_split(heads: int, kv_heads: int, tp: int) -> HeadSplit:
    """Whole KV groups per rank; with fewer KV heads than ranks, each KV head is replicated on
    the ranks that share its group's query heads (as vLLM does)."""
    if heads % kv_heads:
        raise InvalidOptionError(f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
    group = heads // kv_heads
    if kv_heads >= tp:
        kv = even_ranges(kv_heads, tp)
        return HeadSplit(tuple((a * group, b * group) for a, b in kv), tuple(kv))
    if tp % kv_heads or group % (tp // kv_heads):
        raise InvalidOptionError(
            f"tp={tp} cannot split {heads} query heads over {kv_heads} KV heads evenly: each rank must hold "
            f"whole KV groups, or tp must be a multiple of {kv_heads} that divides each group of {group} "
            f"query heads. Use tp in {sorted(_valid_tp(heads, kv_heads))} (or pp= for more ranks).")
    per = tp // kv_heads
    q = even_ranges(heads, tp)
    return HeadSplit(tuple(q), tuple((r // per, r // per + 1) for r in range(tp)))


def _valid_tp(heads: int, kv_heads: int) -> set[int]:
    ok = set(range(1, kv_heads + 1))
    ok |= {t for t in range(kv_heads, heads + 1) if t % kv_heads == 0 and (heads // kv_heads) % (t // kv_heads) == 0}
    return ok


@dataclass(frozen=True)
class ShardSpec:
    """How one module is split over the tp ranks.

    dim: "out" (column-parallel, or the vocabulary of an lm_head/embedding) or "in"
    (row-parallel). pieces[r]: rank r's element ranges along that dim, concatenated in
    order (fused q|k|v or gate|up keep one range per segment). reduce: all-reduce the
    output (row-parallel); gather: all-gather the output along its last dim (vocab lm_head).
    """

    kind: str  # "column" | "row" | "vocab"
    dim: str
    pieces: tuple[tuple[Range, ...], ...]
    reduce: bool = False
    gather: bool = False

    def size(self, rank: int) -> int:
        return sum(b - a for a, b in self.pieces[rank])


@dataclass(frozen=True)
class TensorLayout:
    """The model-wide split: heads, MLP channels and vocabulary per tp rank."""

    tp: int
    head_dim: int
    heads: int
    kv_heads: int
    split: HeadSplit
    intermediate: int
    mlp: tuple[Range, ...]
    vocab: int
    vocab_ranges: tuple[Range, ...] | None  # None: embedding and lm_head replicated

    def local_heads(self, rank: int) -> tuple[int, int]:
        (qa, qb), (ka, kb) = self.split.q[rank], self.split.kv[rank]
        return qb - qa, kb - ka


def tensor_layout(model: nn.Module, spec: ArchitectureSpec, tp: int, vocab_parallel: bool,
                  mlp_unit: int = 1) -> TensorLayout:
    """Split the model's heads, MLP channels and (optionally) vocabulary over tp ranks.

    `mlp_unit`: MLP ranges are multiples of it (the quantization group size, so per-group
    scales of the row-parallel down projection split with their weights).
    """
    heads, kv_heads, head_dim, intermediate = block_sizes(model, spec)
    if intermediate % mlp_unit or intermediate // mlp_unit < tp:
        raise InvalidOptionError(
            f"the MLP's {intermediate} channels cannot be split over tp={tp} ranks in units of {mlp_unit} "
            "(the quantization group size); use a group size that divides it, or a smaller tp.")
    embed = model.get_submodule(spec.model_roles["embed"])
    vocab = int(getattr(embed, "num_embeddings", 0) or embed.weight.shape[0])
    return TensorLayout(tp=tp, head_dim=head_dim, heads=heads, kv_heads=kv_heads,
                        split=head_split(heads, kv_heads, tp), intermediate=intermediate,
                        mlp=tuple(even_ranges(intermediate, tp, mlp_unit)), vocab=vocab,
                        vocab_ranges=tuple(even_ranges(vocab, tp)) if vocab_parallel and tp > 1 else None)


def _scaled(r: Range, k: int, offset: int = 0) -> Range:
    return (offset + r[0] * k, offset + r[1] * k)


def role_shard(role: str, lay: TensorLayout) -> ShardSpec | None:
    """The split of a module playing `role` (None: replicated)."""
    d, tp = lay.head_dim, lay.tp
    q_width, kv_width = lay.heads * d, lay.kv_heads * d
    per_rank: list[tuple[Range, ...]] = []
    for r in range(tp):
        q, kv, mlp = _scaled(lay.split.q[r], d), _scaled(lay.split.kv[r], d), lay.mlp[r]
        per_rank.append({
            "q": (q,), "k": (kv,), "v": (kv,), "o": (q,),
            "qkv": (q, _scaled(lay.split.kv[r], d, q_width), _scaled(lay.split.kv[r], d, q_width + kv_width)),
            "gate": (mlp,), "up": (mlp,), "fc_in": (mlp,), "down": (mlp,), "fc_out": (mlp,),
            "gate_up": (mlp, (lay.intermediate + mlp[0], lay.intermediate + mlp[1])),
        }.get(role, ()))
    if role in COLUMN_ROLES:
        return ShardSpec("column", "out", tuple(per_rank))
    if role in ROW_ROLES:
        return ShardSpec("row", "in", tuple(per_rank), reduce=True)
    if role in ("embed", "lm_head") and lay.vocab_ranges is not None:
        return ShardSpec("vocab", "out", tuple((r,) for r in lay.vocab_ranges), gather=role == "lm_head")
    return None


def stage_ranges(n_layers: int, pp: int) -> list[Range]:
    """Contiguous layers per pipeline stage. The last stage also runs the lm_head (a large
    matmul), so when the layers do not divide evenly the earlier stages take the extra ones."""
    if n_layers < pp:
        raise InvalidOptionError(f"pp={pp} needs at least {pp} decoder layers; the model has {n_layers}. "
                                 "Use a smaller pp.")
    return even_ranges(n_layers, pp)


def mlp_unit_of(entries: dict[str, PlanEntry]) -> int:
    """The quantization group size of the row-parallel MLP projection (1 without groups), so
    its per-group scales split with their weights."""
    for e in entries.values():
        if e.role in ("down", "fc_out") and e.action == "quantize" and e.quant:
            spec = QuantSpec.parse(e.quant)
            if spec.granularity == "group":
                return spec.group_size
    return 1
