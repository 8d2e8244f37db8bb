"""Tensor parallelism: cut each module down to this rank's slice, then wire the messages.

Slicing keeps every module's name and type (an nn.Linear stays an nn.Linear with fewer
rows; an Int8Linear keeps its integer weight, scales and zero points for those rows), so
the plan, the kernels pass and save/load see the same model, only smaller. The messages
are forward hooks: a row-parallel linear all-reduces its output (its bias lives on tp rank 0
only, so it is added once); a vocab-parallel lm_head all-gathers its logits; a
vocab-parallel embedding looks up the ids it holds and all-reduces. Attention modules get
their local head counts. Works on meta tensors too, which is how a checkpoint is read
slice by slice (parallel/checkpoint.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ..integrations.hf_adapter import is_conv1d
from ..integrations.transformers import ArchitectureSpec
from ..quant.backends import usable_backend
from ..quant.embedding import Int8Embedding, TiedInt8Linear
from ..quant.modules import Int8Linear
from ..quant.w8a8 import W8A8Linear
from .comm import ParallelContext
from .layout import Range, ShardSpec, TensorLayout

HOOKS_ATTR = "_hetero_tp_hooks"


def take(t: torch.Tensor | None, dim: int, pieces: tuple[Range, ...]) -> torch.Tensor | None:
    """The concatenation of t's ranges along `dim`, as a new contiguous tensor."""
    if t is None:
        return None
    parts = [t.narrow(dim, a, b - a) for a, b in pieces]
    # A copy, never a view: a view would keep the whole unsharded tensor alive.
    return parts[0].clone(memory_format=torch.contiguous_format) if len(parts) == 1 else torch.cat(parts, dim=dim)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _record(m: nn.Module, name: str, dim: int | None, pieces: tuple[Range, ...] = ()) -> None:
    """Remember which slice of the checkpoint tensor `name` this module now holds, so a meta
    model sliced here can read exactly that from safetensors (dim None: zeros, not read)."""
    m.__dict__.setdefault("_hetero_slices", {})[name] = (dim, pieces)


def _scaled_pieces(pieces: tuple[Range, ...], unit: int) -> tuple[Range, ...]:
    if any(a % unit or b % unit for a, b in pieces):
        raise ValueError(f"shard boundaries {pieces} are not multiples of the quantization group size {unit}")
    return tuple((a // unit, b // unit) for a, b in pieces)


def _slice_linear(m: nn.Linear, s: ShardSpec, pieces, keep_bias: bool) -> None:
    if s.dim == "out":
        m.weight = _param(take(m.weight.data, 0, pieces))
        _record(m, "weight", 0, pieces)
        if m.bias is not None:
            m.bias = _param(take(m.bias.data, 0, pieces))
            _record(m, "bias", 0, pieces)
        m.out_features = m.weight.shape[0]
    else:
        m.weight = _param(take(m.weight.data, 1, pieces))
        _record(m, "weight", 1, pieces)
        if m.bias is not None and not keep_bias:
            m.bias = None
        m.in_features = m.weight.shape[1]


def _slice_conv1d(m: nn.Module, s: ShardSpec, pieces, keep_bias: bool) -> None:
    """GPT-2's Conv1D stores its weight (in, out)."""
    if s.dim == "out":
        m.weight = _param(take(m.weight.data, 1, pieces))
        m.bias = _param(take(m.bias.data, 0, pieces))
        _record(m, "weight", 1, pieces)
        _record(m, "bias", 0, pieces)
        m.nf = m.weight.shape[1]
    else:
        m.weight = _param(take(m.weight.data, 0, pieces))
        _record(m, "weight", 0, pieces)
        if not keep_bias:
            m.bias = _param(torch.zeros_like(m.bias.data))  # Conv1D always adds a bias
            _record(m, "bias", None)
    m.nx = m.weight.shape[0]


def _slice_int8(m: Int8Linear, s: ShardSpec, pieces, keep_bias: bool) -> None:
    """Scales and zero points follow their weight: per-channel ones are per output row
    (whole on every rank for a row-parallel split), per-group ones per (row, group)."""
    if s.dim == "out":
        m.qweight = take(m.qweight, 0, pieces)
        m.scale, m.zero_point = take(m.scale, 0, pieces), take(m.zero_point, 0, pieces)
        m.bias = take(m.bias, 0, pieces)
    else:
        m.qweight = take(m.qweight, 1, pieces)
        if m.group_size is not None:
            groups = _scaled_pieces(pieces, m.group_size)
            m.scale, m.zero_point = take(m.scale, 1, groups), take(m.zero_point, 1, groups)
        if not keep_bias:
            m.bias = None
    m.out_features, m.in_features = m.qweight.shape
    m.backend = usable_backend(m.in_features, m.qweight.device, m.backend, m.group_size, m.zero_point is not None)
    m._refresh()


def _slice_w8a8(m: W8A8Linear, s: ShardSpec, pieces, keep_bias: bool) -> None:
    if s.dim != "out":
        raise ValueError("a row-parallel W8A8 linear would quantize a different slice of the activations on each "
                         "rank; the planner keeps row-parallel layers weight-only")
    m.qweight, m.scale, m.bias = take(m.qweight, 0, pieces), take(m.scale, 0, pieces), take(m.bias, 0, pieces)
    m.outlier_weight = take(m.outlier_weight, 0, pieces)
    m.out_features = m.qweight.shape[0]


def _slice_embedding(m: nn.Module, pieces) -> None:
    (a, b), = pieces
    if isinstance(m, Int8Embedding):
        m.qweight, m.scale = take(m.qweight, 0, pieces), take(m.scale, 0, pieces)
        m._refresh()
    else:
        m.weight = _param(take(m.weight.data, 0, pieces))
        _record(m, "weight", 0, pieces)
    m.num_embeddings = b - a
    pad = getattr(m, "padding_idx", None)
    if pad is not None:
        m.padding_idx = pad - a if a <= pad < b else None


def slice_module(m: nn.Module, s: ShardSpec, rank: int) -> None:
    """Cut `m` down, in place, to tp rank `rank`'s part of split `s`."""
    pieces, keep_bias = s.pieces[rank], rank == 0
    if isinstance(m, TiedInt8Linear):
        # Reads its embedding's tensors: slice those unless the embedding pass already did
        # (on a later pipeline stage the embedding itself is gone and only the tie holds them).
        if m.embedding.num_embeddings != s.size(rank):
            _slice_embedding(m.embedding, pieces)
        m.out_features = m.embedding.num_embeddings
        return
    if isinstance(m, (nn.Embedding, Int8Embedding)):
        _slice_embedding(m, pieces)
    elif isinstance(m, Int8Linear):
        _slice_int8(m, s, pieces, keep_bias)
    elif isinstance(m, W8A8Linear):
        _slice_w8a8(m, s, pieces, keep_bias)
    elif isinstance(m, nn.Linear):
        _slice_linear(m, s, pieces, keep_bias)
    elif is_conv1d(m):
        _slice_conv1d(m, s, pieces, keep_bias)
    else:
        raise TypeError(f"cannot split a {type(m).__name__} over tensor-parallel ranks")


class _LocalConfig:
    """The model's config with this rank's head counts (for attention code that reads
    config.num_attention_heads); everything else reads through to the live config."""

    def __init__(self, base, **local) -> None:
        self.__dict__["_base"] = base
        self.__dict__.update(local)

    def __getattr__(self, name: str):
        if name == "_base":
            raise AttributeError(name)
        return getattr(self._base, name)


def localize_attention(attn: nn.Module, spec: ArchitectureSpec, lay: TensorLayout, rank: int) -> None:
    """Set the head counts an attention module reads to this rank's."""
    heads, kv = lay.local_heads(rank)
    values = {"heads": heads, "kv_heads": kv, "width": heads * lay.head_dim}
    for attr, what in spec.tp_attention.items():
        if attr.startswith("config."):
            base = attn.config._base if isinstance(attn.config, _LocalConfig) else attn.config
            local = {k: v for k, v in attn.config.__dict__.items() if k != "_base"} \
                if isinstance(attn.config, _LocalConfig) else {}
            local[attr.split(".", 1)[1]] = values[what]
            attn.config = _LocalConfig(base, **local)
        else:
            setattr(attn, attr, values[what])
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = heads // kv


def _vocab_forward(module: nn.Module, start: int, size: int, ctx: ParallelContext):
    """Look up the ids this rank holds (zeros for the others), then sum over ranks."""
    lookup = module.forward

    def forward(ids: torch.Tensor) -> torch.Tensor:
        local = ids - start
        outside = (local < 0) | (local >= size)
        out = lookup(local.masked_fill(outside, 0))
        return ctx.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))

    return forward


def wire(module: nn.Module, s: ShardSpec, ctx: ParallelContext) -> None:
    """Attach the messages split `s` needs; removable with unwire()."""
    hooks = []
    if s.reduce:
        hooks.append(module.register_forward_hook(lambda m, args, out: ctx.all_reduce(out)))
        module.hetero_row_parallel = True  # no residual add inside its matmul: it must follow the all-reduce
    elif s.gather:
        sizes = [s.size(r) for r in range(ctx.tp)]
        hooks.append(module.register_forward_hook(lambda m, args, out: ctx.all_gather_last(out, sizes)))
    elif s.kind == "vocab":
        (a, b), = s.pieces[ctx.tp_rank]
        module.forward = _vocab_forward(module, a, b - a, ctx)
    setattr(module, HOOKS_ATTR, hooks)


def unwire(module: nn.Module) -> None:
    for h in getattr(module, HOOKS_ATTR, ()):
        h.remove()
    for attr in (HOOKS_ATTR, "hetero_row_parallel", "forward"):
        module.__dict__.pop(attr, None)


def slice_tensor_parallel(model: nn.Module, spec: ArchitectureSpec, roles: dict[str, str], lay: TensorLayout,
                          rank: int) -> list[tuple[str, str, str]]:
    """Cut every module with a tp role down to this rank's part (meta tensors too) and give
    attention modules their local head counts."""
    from .layout import role_shard

    done = []
    tied = _tied_lm_head(model, spec)
    for name, role in roles.items():
        shard = role_shard(role, lay)
        if shard is None:
            continue
        module = model.get_submodule(name)
        if not (role == "lm_head" and tied):
            slice_module(module, shard, rank)
        done.append((name, type(module).__name__, f"{shard.kind}-parallel, tp rank {rank} of {lay.tp}"))
    if tied:  # the lm_head reads the (now sliced) embedding's weight, as before
        tied.weight = model.get_submodule(spec.model_roles["embed"]).weight
    for block in model.get_submodule(spec.layers):
        attn = getattr(block, spec.roles["attention"].split(".")[0], None)
        if attn is not None:  # None: a layer another pipeline stage runs
            localize_attention(block.get_submodule(spec.roles["attention"]), spec, lay, rank)
    return done


def wire_tensor_parallel(model: nn.Module, roles: dict[str, str], lay: TensorLayout, ctx: ParallelContext) -> None:
    """The messages of every split module; after quantization, which replaces modules."""
    from .layout import role_shard

    for name, role in roles.items():
        shard = role_shard(role, lay)
        if shard is not None:
            wire(model.get_submodule(name), shard, ctx)


def _tied_lm_head(model: nn.Module, spec: ArchitectureSpec) -> nn.Module | None:
    """The float lm_head sharing its weight with the embedding, if any."""
    try:
        head = model.get_submodule(spec.model_roles["lm_head"])
        embed = model.get_submodule(spec.model_roles["embed"])
    except AttributeError:
        return None
    w = getattr(head, "weight", None)
    return head if isinstance(w, torch.Tensor) and w is getattr(embed, "weight", None) else None
