"""Pipeline parallelism: each stage holds a contiguous run of decoder layers.

Every rank runs the same transformers forward (so generate(), masks, rotary embeddings
and caches stay transformers' own); the parts another stage computes are stand-ins with
no weights. The first layer of a stage receives the hidden states from the previous
stage, the last one sends them on, and the logits go from the last stage to every rank,
so every rank's generate() picks the same tokens. Each stage's KV cache holds only its
own layers; a stand-in layer records one value per token for its layer so that the cache's
length, which transformers reads from layer 0, stays right on every stage.

A batched prompt is cut into micro-batches: the first stage sends micro-batch i and starts
on i + 1 while the next stage works on i. Their caches are joined along the batch at the end.
"""
from __future__ import annotations

import torch
from torch import nn

from .._modules import replace_module
from ..integrations import hf_adapter as hf
from ..integrations.transformers import ArchitectureSpec
from .comm import ParallelContext


def _find_cache(args, kwargs):
    for value in (*args, *kwargs.values()):
        if hasattr(value, "update") and hasattr(value, "get_seq_length"):
            return value
    return None


class SkippedLayer(nn.Module):
    """A decoder layer another pipeline stage runs: passes hidden states through unchanged."""

    def __init__(self, layer_idx: int, original: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type  # read by some models' mask selection

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        cache = _find_cache(args, kwargs)
        if cache is not None:
            b, s = hidden_states.shape[:2]
            # One value per token (not zero heads: transformers reads an empty layer as length 0).
            marker = hidden_states.new_zeros(b, 1, s, 1)
            cache.update(marker, marker, self.layer_idx)
        return hidden_states

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx} (runs on another pipeline stage)"


class EmbeddingStandIn(nn.Module):
    """The embedding on a later stage: the hidden states arrive from the previous stage."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden, self.dtype = hidden, dtype

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.hidden, dtype=self.dtype, device=ids.device)


class LogitsStandIn(nn.Module):
    """The lm_head on an earlier stage: the logits arrive from the last stage."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(*x.shape[:-1], self.vocab, dtype=x.dtype, device=x.device)


class PipelineRuntime:
    """This rank's messages for one model: receive, send, share the logits."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.pending: list = []  # (work, tensor) of sends not yet completed
        self.logits_src = ctx.stage_ranks[-1][0]

    def receive(self, module, args):
        prev = self.ctx.peer_in_stage(self.ctx.stage - 1)
        hidden = self.ctx.recv(torch.empty_like(args[0]), prev)
        return (hidden, *args[1:])

    def send(self, module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        nxt = self.ctx.peer_in_stage(self.ctx.stage + 1)
        self.pending.append((self.ctx.isend(hidden, nxt), hidden))

    def finish_sends(self) -> None:
        while self.pending:
            work, _ = self.pending.pop(0)
            self.ctx.wait(work, "sending activations to the next pipeline stage")

    def share_logits(self, module, args, out):
        """After the model's forward (after all micro-batches): every rank gets the logits."""
        self.finish_sends()
        out.logits = self.ctx.broadcast(out.logits.contiguous(), self.logits_src)
        return out


def split_pipeline(model: nn.Module, spec: ArchitectureSpec, layers: tuple[int, int], ctx: ParallelContext,
                   micro_batches: int) -> list[tuple[str, str, str]]:
    """Keep this stage's layers (and the embedding on the first stage, the final norm and
    lm_head on the last); stand-ins for the rest; wire the messages."""
    first, last = ctx.stage == 0, ctx.stage == ctx.pp - 1
    blocks = model.get_submodule(spec.layers)
    swaps = []
    for i in range(len(blocks)):
        if not layers[0] <= i < layers[1]:
            swaps.append((f"{spec.layers}.{i}", type(blocks[i]).__name__, f"SkippedLayer (stage {ctx.stage})"))
            blocks[i] = SkippedLayer(i, blocks[i])
    hidden = hf.text_config(model.config).hidden_size
    if not first:
        for role in ("embed", "pos_embed"):
            if role in spec.model_roles:
                replace_module(model, spec.model_roles[role], EmbeddingStandIn(hidden, model.dtype))
                swaps.append((spec.model_roles[role], "Embedding", "EmbeddingStandIn"))
    if not last:
        vocab = hf.text_config(model.config).vocab_size
        replace_module(model, spec.model_roles["final_norm"], nn.Identity())
        replace_module(model, spec.model_roles["lm_head"], LogitsStandIn(vocab))
        swaps.append((spec.model_roles["lm_head"], "Linear", "LogitsStandIn"))
    rt = PipelineRuntime(ctx)
    hooks = []
    if not first:
        hooks.append(blocks[layers[0]].register_forward_pre_hook(rt.receive))
    if not last:
        hooks.append(blocks[layers[1] - 1].register_forward_hook(rt.send))
    hooks.append(model.register_forward_hook(rt.share_logits))
    model._hetero_pp_hooks = hooks
    model.hetero_pipeline = rt
    model.forward = _micro_batched(model.forward, rt, micro_batches, ctx.pp, hf.cache_argument(model))
    return swaps


def _batch_size(kwargs) -> int:
    ids = kwargs.get("input_ids")
    ids = ids if ids is not None else kwargs.get("inputs_embeds")
    return 0 if ids is None else ids.shape[0]


def _given_cache(kwargs) -> tuple[str | None, object]:
    """(keyword, cache) of the KV cache in a forward's kwargs (its name depends on the release)."""
    return next(((n, kwargs[n]) for n in hf.CACHE_ARGUMENTS if kwargs.get(n) is not None), (None, None))


def _splittable_prompt(kwargs) -> bool:
    """A prompt (several tokens) into an empty dynamic cache, with at most a 2-D padding mask.
    A static cache comes with a 4-D mask sized for it (generate() builds it), so such a
    prompt runs whole."""
    ids = kwargs.get("input_ids")
    ids = ids if ids is not None else kwargs.get("inputs_embeds")
    cache, mask = _given_cache(kwargs)[1], kwargs.get("attention_mask")
    fresh_cache = cache is None or (type(cache) is hf.dynamic_cache_class() and cache.get_seq_length() == 0)
    return ids is not None and ids.shape[1] > 1 and fresh_cache and (mask is None or mask.dim() == 2)


def _micro_batched(forward, rt: PipelineRuntime, micro_batches: int, pp: int, cache_arg: str):
    """forward(**kwargs) that cuts a batched prompt into micro-batches so the stages overlap.
    `cache_arg`: the keyword the model's forward takes its KV cache under."""
    DynamicCache = hf.dynamic_cache_class()

    def run(*args, **kwargs):
        batch = _batch_size(kwargs)
        pieces = min(batch, micro_batches or 4 * pp)
        if args or pieces < 2 or not _splittable_prompt(kwargs):
            return forward(*args, **kwargs)
        bounds = torch.linspace(0, batch, pieces + 1).round().long().tolist()
        use_cache = kwargs.get("use_cache", True) is not False
        given, target = _given_cache(kwargs)
        kwargs.pop(given, None)
        if use_cache and target is None:
            target = DynamicCache()
        outputs, caches = [], []
        # The inner forwards skip the model's hooks: the logits are shared once, after all pieces.
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch
                        and k != "cache_position" else v) for k, v in kwargs.items()}
            if use_cache:
                part[cache_arg] = DynamicCache()
                caches.append(part[cache_arg])
            outputs.append(forward(**part))
        out = outputs[-1]
        out.logits = torch.cat([o.logits for o in outputs])
        if use_cache:  # one cache for the whole batch, as the caller expects
            for i in range(len(caches[0].layers)):
                target.update(torch.cat([c.layers[i].keys for c in caches]),
                              torch.cat([c.layers[i].values for c in caches]), i)
            hf.set_output_cache(out, target)
        return out

    return run
