"""hetero_llm's attention as a named implementation in transformers' attention interface.

Models whose attention module we do not replace (GPT-2, OPT, Phi-3, ...) still call
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`. Registering "hetero_llm" there (with
SDPA's boolean mask builder) adds a choice without changing any other: only a model instance
whose plan selects it, through `model.set_attn_implementation("hetero_llm")`, runs it.
"""
from __future__ import annotations

import torch

NAME = "hetero_llm"


def hetero_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: q (b, h, s, d), k/v (b, hk, S, d) ->
    ((b, s, h, d), None). What the kernels do not cover (dropout while training, soft-capping,
    position biases, attention sinks, returning the weights) goes to transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..kernels.dispatch import attend

    special = ("softcap", "position_bias", "s_aux", "sinks", "cache")
    if (dropout and module.training) or any(kwargs.get(k) is not None for k in special) \
            or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend("triton", query, key, value, attention_mask, scale, causal=bool(causal))
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make "hetero_llm" a valid `attn_implementation` (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, hetero_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
