"""Structured pruning: remove whole MLP channels and KV-head groups, so the model gets smaller.

Every decoder layer keeps the same number of channels and heads, so the model stays an
ordinary transformers model of its family: the config's sizes are updated (intermediate_size,
num_attention_heads, num_key_value_heads, head_dim kept) and generate(), static caches,
save_pretrained and from_pretrained all work on the result. Which channels go is decided per
layer by an importance score: Wanda-style ||x_j|| * ||W[:, j]|| on the input of the layer's
output projection (calibration data), or weight norms alone.

GQA: a "group" is one KV head with the query heads that read it; only whole groups are removed,
so the query/KV ratio (and attention's num_key_value_groups) is unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import InvalidOptionError, UnsupportedArchitectureError
from ..integrations.transformers import ArchitectureSpec, block_module, block_sizes
from ..parallel.layout import ShardSpec
from ..parallel.tensor import slice_module
from ..quant.modules import linear_weight
from .masks import sum_of_squares

MLP_IN, MLP_OUT = ("gate", "up", "gate_up", "fc_in"), ("down", "fc_out")
ATTN_IN, ATTN_OUT = ("q", "k", "v", "qkv"), ("o",)
# Channel counts are rounded to this so the INT8 kernels keep their fast path (K % 64 == 0),
# for widths where the rounding moves the share removed by at most a few percent.
_ALIGN, _ALIGN_FROM = 64, 1024


@dataclass(frozen=True)
class Shrink:
    """Per-layer sizes before and after structured pruning (identical for every layer)."""

    mlp: tuple[int, int]
    kv_heads: tuple[int, int]
    heads: tuple[int, int]
    head_dim: int

    @property
    def changes_attention(self) -> bool:
        return self.kv_heads[1] != self.kv_heads[0]


def _kept(total: int, share: float) -> int:
    keep = total - int(round(total * share))
    if total >= _ALIGN_FROM and total % _ALIGN == 0:
        keep = int(round(keep / _ALIGN)) * _ALIGN
    return max(1, min(total, keep))


def plan_shrink(model: nn.Module, spec: ArchitectureSpec | None, cfg: PruneConfig) -> Shrink:
    """The sizes structured pruning leaves; refuses what the architecture cannot express."""
    if spec is None or "mlp" not in spec.shrink_config:
        raise UnsupportedArchitectureError(
            f"structured pruning needs a role table with config sizes; {getattr(model.config, 'model_type', '?')!r} "
            "has none. Use prune='magnitude' or 'wanda' (masks), which work on any model.")
    heads, kv, head_dim, inter = block_sizes(model, spec)
    if cfg.heads > 0 and "kv_heads" not in spec.shrink_config:
        raise UnsupportedArchitectureError(
            f"{spec.family} derives its head size from hidden_size / heads, so removing heads would change it; "
            "head pruning works for Llama-style families (llama, mistral, qwen2, gemma, phi3). Use heads=0.")
    kv_after = kv - int(kv * cfg.heads)
    if cfg.heads > 0 and kv_after == kv:
        raise InvalidOptionError(f"heads={cfg.heads:g} of {kv} KV-head groups rounds to none removed (only whole "
                                 f"groups go); use heads >= {1 / kv:.3g} or heads=0.")
    kv_after = max(1, kv_after)
    return Shrink(mlp=(inter, _kept(inter, cfg.mlp)), kv_heads=(kv, kv_after),
                  heads=(heads, heads // kv * kv_after), head_dim=head_dim)


def shrunk_config(config, spec: ArchitectureSpec, shrink: Shrink):
    """A copy of `config` describing the pruned model."""
    new = copy.deepcopy(config)
    keys = spec.shrink_config
    setattr(new, keys["mlp"], shrink.mlp[1])
    if shrink.changes_attention:
        setattr(new, keys["head_dim"], shrink.head_dim)  # set first: it may default to hidden / heads
        setattr(new, keys["heads"], shrink.heads[1])
        setattr(new, keys["kv_heads"], shrink.kv_heads[1])
    return new


def pruned_view(model: nn.Module, spec: ArchitectureSpec, shrink: Shrink) -> nn.Module:
    """The pruned model's architecture with meta weights: what the planner profiles and what a
    plan is checked against. The model itself is not touched."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        view = type(model)(shrunk_config(model.config, spec, shrink))
    view.to(dtype=model.dtype)
    view.tie_weights()
    return view.eval()


# -- importance ---------------------------------------------------------------------------


def _column_norms(module: nn.Module) -> torch.Tensor:
    return linear_weight(module).detach().float().norm(dim=0)


def _row_norms(module: nn.Module) -> torch.Tensor:
    return linear_weight(module).detach().float().norm(dim=1)


def _runs(idx: torch.Tensor, offset: int = 0) -> tuple[tuple[int, int], ...]:
    """Sorted indices as contiguous (start, end) ranges, for the slicing helpers."""
    out: list[list[int]] = []
    for i in (idx + offset).tolist():
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


def _slice(module: nn.Module, dim: str, pieces: tuple[tuple[int, int], ...]) -> None:
    slice_module(module, ShardSpec(kind="column" if dim == "out" else "row", dim=dim, pieces=(pieces,)), 0)
    module.__dict__.pop("_hetero_slices", None)  # the slicer's checkpoint record: not a tp shard


def _channels(heads_idx: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads_idx.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def _in_side(modules: list[nn.Module], width: int, limit: int | None = None) -> torch.Tensor:
    """Per channel, the norm of the rows that produce it (over gate and up, or the q part of qkv)."""
    total = torch.zeros(width)
    for m in modules:
        r = _row_norms(m)[:limit] if limit else _row_norms(m)
        total += (r.reshape(-1, width) ** 2).sum(dim=0).cpu()
    return total.sqrt()


def _scores(out_proj: nn.Module, in_projs: list[nn.Module], stats: torch.Tensor | None,
            limit: int | None = None) -> torch.Tensor:
    """Importance of each input channel of an output projection (down, o).

    With calibration statistics (sum of x_j^2 over the calibration tokens, or their Gram matrix):
    ||x_j|| * ||W[:, j]||,
    the size of that channel's contribution to the layer's output. Without: ||W[:, j]|| times the
    norm of the input-side rows that produce the channel.
    """
    cols = _column_norms(out_proj).cpu()
    if stats is not None:
        return sum_of_squares(stats).float().cpu().sqrt() * cols
    return _in_side(in_projs, cols.numel(), limit) * cols


def _refit(out_proj: nn.Module, gram: torch.Tensor | None, keep: torch.Tensor, damping: float = 0.01):
    """Slice the output projection to the kept input channels and, given the Gram matrix G = X^T X
    of its calibration inputs, let the kept channels make up for the removed ones by least squares:
    W' = W_keep + W_drop G[drop, keep] G[keep, keep]^-1, the minimizer of ||X W^T - X_keep W'^T||.
    Written this way the damping only touches the correction: channels that never correlate with
    a removed one keep their weights exactly."""
    correction = None
    if gram is not None and gram.dim() == 2:
        w = linear_weight(out_proj).detach().float().cpu()
        g = gram.float().cpu()
        drop = torch.ones(g.shape[0], dtype=torch.bool)
        drop[keep] = False
        gk = g[keep][:, keep]
        gk = gk + damping * torch.diagonal(gk).mean().clamp(min=1e-12) * torch.eye(len(keep))
        correction = torch.linalg.solve(gk, (w[:, drop] @ g[drop][:, keep]).t()).t()
        if not torch.isfinite(correction).all():
            correction = None  # degenerate statistics: keep the plain slice
    _slice(out_proj, "in", _runs(keep))
    if correction is not None:
        target = linear_weight(out_proj)
        target.add_(correction.to(target.dtype))  # writes through a Conv1D's transposed view too


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.topk(scores, keep, sorted=False).indices.sort().values


def _shrink_mlp(model: nn.Module, spec: ArchitectureSpec, i: int, shrink: Shrink, stats: dict) -> str:
    prefix = f"{spec.layers}.{i}."
    out_role = "down" if "down" in spec.roles else "fc_out"
    out = block_module(model, spec, out_role, i)
    ins = {r: block_module(model, spec, r, i) for r in MLP_IN if r in spec.roles}
    width = shrink.mlp[0]
    gram = stats.get(prefix + spec.roles[out_role])
    keep = _top(_scores(out, list(ins.values()), gram), shrink.mlp[1])
    for role, m in ins.items():
        _slice(m, "out", _runs(keep) + (_runs(keep, width) if role == "gate_up" else ()))
    _refit(out, gram, keep)
    return prefix + spec.roles.get("mlp", out_role)


def _shrink_attention(model: nn.Module, spec: ArchitectureSpec, i: int, shrink: Shrink, stats: dict) -> str:
    prefix = f"{spec.layers}.{i}."
    heads, kv, hd = shrink.heads[0], shrink.kv_heads[0], shrink.head_dim
    group = heads // kv
    o = block_module(model, spec, "o", i)
    q_side = [block_module(model, spec, "q" if "q" in spec.roles else "qkv", i)]
    gram = stats.get(prefix + spec.roles["o"])
    channel = _scores(o, q_side, gram, limit=heads * hd)
    groups = _top(channel.reshape(kv, group * hd).sum(dim=1), shrink.kv_heads[1])
    q_heads = (groups.unsqueeze(1) * group + torch.arange(group)).reshape(-1)
    qch, kvch = _channels(q_heads, hd), _channels(groups, hd)
    if "qkv" in spec.roles:
        _slice(q_side[0], "out", _runs(qch) + _runs(kvch, heads * hd) + _runs(kvch, (heads + kv) * hd))
    else:
        _slice(q_side[0], "out", _runs(qch))
        _slice(block_module(model, spec, "k", i), "out", _runs(kvch))
        _slice(block_module(model, spec, "v", i), "out", _runs(kvch))
    _refit(o, gram, qch)
    attn = block_module(model, spec, "attention", i)
    values = {"heads": shrink.heads[1], "kv_heads": shrink.kv_heads[1], "width": shrink.heads[1] * hd}
    for attr, what in spec.tp_attention.items():  # module attributes that hold head counts
        if not attr.startswith("config."):
            setattr(attn, attr, values[what])
    return prefix + spec.roles["attention"]


def out_projections(spec: ArchitectureSpec, shrink: Shrink, index: int) -> list[str]:
    """Layer `index`'s modules whose input statistics rank its channels (criterion='wanda')."""
    roles = ["down" if "down" in spec.roles else "fc_out"] + (["o"] if shrink.changes_attention else [])
    return [f"{spec.layers}.{index}.{spec.roles[r]}" for r in roles]


def shrink_layer(model: nn.Module, spec: ArchitectureSpec, index: int, shrink: Shrink, stats: dict) -> list[str]:
    """Remove layer `index`'s least important channels and groups, in place. `stats`: sum of
    squared inputs per channel of its output projections, or {} for weight norms only."""
    pruned = []
    with torch.no_grad():
        if shrink.mlp[1] != shrink.mlp[0]:
            pruned.append(_shrink_mlp(model, spec, index, shrink, stats))
        if shrink.changes_attention:
            pruned.append(_shrink_attention(model, spec, index, shrink, stats))
    return pruned


def update_config(model: nn.Module, spec: ArchitectureSpec, shrink: Shrink) -> None:
    """Give the model a config with the pruned sizes, swapped in wherever the model holds the old
    one: the caller's config object may be shared with other models, which must not change."""
    old, new = model.config, shrunk_config(model.config, spec, shrink)
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new
