"""A Llama-style decoder layer's forward with its residual adds fused into neighbouring kernels.

transformers' layer computes

    x = x + o_proj(attention(norm1(x)));  x = x + down_proj(mlp(norm2(x)))

with each `+` a separate pass over the hidden states. Here each add goes inside the kernel
next to it: into the o_proj / down_proj matmul's epilogue (`linear_add`) when that projection is
a plain Linear on the Triton path, otherwise into the following RMSNorm (add and normalize in
one pass, for the attention's residual; the MLP's is a plain add).

The forward is bound to the layer *instance* (`layer.forward`), so the layer keeps its class:
transformers' output recording (output_hidden_states), hooks and isinstance checks still see
the original decoder layer. `unbind` restores the class's own forward.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..integrations.hf_adapter import take_cache
from ..integrations.transformers import ArchitectureSpec
from ..kernels.dispatch import fuses_residual
from .modules import GatedMLP, RMSNorm, RotaryAttention

# The children the forward below reads, by role: a family's table must name these (and its
# layers have no other child), since this forward replaces the class's.
FORWARD_ROLES = {"attention": "self_attn", "mlp": "mlp", "attn_norm": "input_layernorm",
                 "mlp_norm": "post_attention_layernorm"}


def layout_fits(layer: nn.Module, spec: ArchitectureSpec | None = None) -> bool:
    """Whether `layer` has exactly the children this forward reads, and (given the family's
    table) the table names them in the same roles and no others: a child it does not know
    would be skipped by the forward."""
    children = set(dict(layer.named_children()))
    if spec is not None and (any(spec.roles.get(r) != n for r, n in FORWARD_ROLES.items())
                             or spec.children() != children):
        return False
    return children == set(FORWARD_ROLES.values())


def fused_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                        past_key_values=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    attn, mlp = self.self_attn, self.mlp
    cache = take_cache(kwargs, past_key_values)  # `cache=` from transformers >= 5.25
    h = self.input_layernorm(hidden_states)
    attn_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    if fuses_residual(attn.backend, attn.o_proj):
        x, _ = attn(h, residual=hidden_states, **attn_kwargs)
        h = self.post_attention_layernorm(x)
    else:
        a, _ = attn(h, **attn_kwargs)
        h, x = self.post_attention_layernorm(a, residual=hidden_states)
    return mlp(h, residual=x)


def can_fuse(layer: nn.Module, spec: ArchitectureSpec | None = None) -> bool:
    """Whether `layer` is a Llama-style block whose parts the kernels pass has replaced."""
    children = dict(layer.named_children())
    return (layout_fits(layer, spec) and isinstance(children["self_attn"], RotaryAttention)
            and isinstance(children["mlp"], GatedMLP) and isinstance(children["input_layernorm"], RMSNorm)
            and isinstance(children["post_attention_layernorm"], RMSNorm))


def bind(layer: nn.Module, spec: ArchitectureSpec | None = None) -> None:
    """Run `layer` with `fused_layer_forward` (this instance only)."""
    if not can_fuse(layer, spec):
        raise ValueError(f"{type(layer).__name__} is not a Llama-style block with fused parts")
    layer.forward = types.MethodType(fused_layer_forward, layer)


def unbind(layer: nn.Module) -> None:
    layer.__dict__.pop("forward", None)


def is_bound(layer: nn.Module) -> bool:
    f = layer.__dict__.get("forward")
    return getattr(f, "__func__", None) is fused_layer_forward
