"""One decode step of a Llama-style model, written so that it can be captured in a CUDA graph.

transformers' forward for one new token builds an attention mask, position ids and rotary
tables on the host, checks them (some checks read GPU values, i.e. wait for the GPU), and walks
the decoder layers. `DecodeStep` computes the same logits from the model's own modules
(embedding, rotary embedding, the decoder layers with hetero_llm's RotaryAttention, final norm,
lm_head) against a transformers StaticCache, with nothing on the host that depends on a value:

- the position of the new token is the cache's own length counter, a tensor on the device;
- instead of a mask, every sequence attends the first `length + 1` keys of the static cache
  (`cache_lens`, read by the split-KV decode kernel on the GPU);
- the input ids live in a fixed buffer (`ids`) that the caller fills before each step.

So every step launches the same kernels with the same arguments, and one CUDA graph captured
from it replays them. That holds for batches without padding (every sequence's keys start at
slot 0), which `hetero_llm.decode.runner` checks once per generate() call.
"""
from __future__ import annotations

import torch
from torch import nn

from ..integrations import hf_adapter as hf
from ..integrations.transformers import ArchitectureSpec
from ..fused.modules import RotaryAttention

# Rotary embeddings whose tables are recomputed from the largest position seen: transformers
# decides that on the host from GPU values, which a captured step cannot do.
DYNAMIC_ROPE = ("dynamic", "longrope")


def static_cache_problem(config) -> str | None:
    """Why transformers' StaticCache for `config` does not suit the step, or None when it does:
    every layer must be a full-attention StaticLayer (sliding windows wrap around their cache)."""
    text = hf.text_config(config)
    if hf.rope_type(text) in DYNAMIC_ROPE:
        return f"its rotary embedding ({hf.rope_type(text)}) is rescaled from the longest position at run time"
    try:  # layers allocate lazily: nothing is allocated here
        cache = hf.new_static_cache(hf.static_cache_class(), text, max_cache_len=8)
    except Exception as e:  # noqa: BLE001 - any config transformers cannot build a static cache for
        return f"transformers cannot build a static KV cache for it ({type(e).__name__}: {e})"
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {hf.static_layer_class().__name__}:
        return f"its static cache has {', '.join(sorted(kinds))} layers (sliding-window attention)"
    return None


class DecodeStep:
    """Logits (batch, 1, vocab) of one new token per sequence, the KV cache updated in place.

    Call `__call__` after writing the new tokens into `ids` (batch, 1). The cache must already
    hold the prompt (the prefill runs through the model's own forward) and have no padding.
    """

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, cache, batch: int) -> None:
        self.embed = model.get_submodule(spec.model_roles["embed"])
        self.layers = list(model.get_submodule(spec.layers))
        self.norm = model.get_submodule(spec.model_roles["final_norm"])
        self.lm_head = model.get_submodule(spec.model_roles["lm_head"])
        self.rotary = model.get_submodule(spec.rotary_embedding)
        self.cache = cache
        self.cache_args = [hf.cache_argument(layer) for layer in self.layers]
        self.first_layer = cache.layers[0]
        device = self.embed.weight.device if hasattr(self.embed, "weight") else next(model.parameters()).device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def __call__(self) -> torch.Tensor:
        # The first layer's counter: tokens already cached, before this step's layers add one.
        # A tensor on the device (StaticLayer.cumulative_length), so reading it needs no sync.
        length = hf.static_layer_length(self.first_layer)
        batch = self.ids.shape[0]
        positions = length.reshape(1, 1).repeat(batch, 1)  # a copy: the counter moves on in layer 0
        cache_lens = (length + 1).to(torch.int32).reshape(1).repeat(batch)  # (batch,), contiguous
        hidden = self.embed(self.ids)
        cos_sin = hf.rotary_tables(self.rotary, hidden, positions)
        for layer, cache_arg in zip(self.layers, self.cache_args):
            hidden = hf.layer_output_hidden(layer(hidden, attention_mask=None, position_ids=positions,
                                                  use_cache=True, position_embeddings=cos_sin,
                                                  cache_lens=cache_lens, **{cache_arg: self.cache}))
        return self.lm_head(self.norm(hidden))


def step_problem(model: nn.Module, spec: ArchitectureSpec | None) -> str | None:
    """Why `DecodeStep` cannot run `model` (after the kernels pass), or None when it can."""
    if spec is None or spec.attention_style != "rotary" or not spec.rotary_embedding:
        return "its family has no Llama-style decode step"
    layers = model.get_submodule(spec.layers)
    if not all(isinstance(getattr(layer, "self_attn", None), RotaryAttention) for layer in layers):
        return "not every decoder layer's attention is hetero_llm's RotaryAttention (fuse_projections off?)"
    return static_cache_problem(model.config)
