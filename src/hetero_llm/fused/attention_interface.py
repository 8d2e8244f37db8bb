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
    position biases, attention sinks, sliding windows, returning the weights) goes to
    transformers' SDPA."""
    from ..kernels.dispatch import attend
    from ..integrations.hf_adapter import sdpa_attention_function

    # The kernels take no sliding window: a windowed layer's keys beyond the window must stay masked.
    special = ("softcap", "position_bias", "s_aux", "sinks", "cache", "sliding_window")
    if (dropout and module.training) or any(kwargs.get(k) is not None for k in special) \
            or kwargs.get("output_attentions"):
        sdpa = sdpa_attention_function()
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                    is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend("triton", query, key, value, attention_mask, scale, causal=bool(causal))
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make "hetero_llm" a valid `attn_implementation` (idempotent); returns the name."""
    from ..integrations.hf_adapter import register_attention

    register_attention(NAME, hetero_attention_forward)
    return NAME
