"""Every transformers calling convention hetero_llm relies on, read in one place.

hetero_llm swaps modules inside transformers models and calls transformers' own modules, caches
and generate(). Those conventions change between releases; each one is read here, never
hard-coded elsewhere, with the releases it differs between in a comment. What this module cannot
foresee (a release that does not exist yet) the self-check of `hetero_llm.selfcheck` catches.

Supported: transformers 5.17.0 (the oldest; GPU machines run it) through the newest tested below.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

OLDEST_SUPPORTED = "5.17.0"
NEWEST_TESTED = "5.25.0"


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def version_tuple(version: str) -> tuple[int, int]:
    """"5.25.0.dev0" -> (5, 25): the release series, for range checks."""
    from packaging.version import Version

    return tuple(Version(version).release[:2]) + (0,) * (2 - len(Version(version).release[:2]))


def installed_transformers() -> str | None:
    """The installed transformers version, read without importing it (importing takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def warn_if_untested() -> None:
    """A HeteroLLMWarning when the installed transformers is outside the tested range. Nothing
    stops it: accelerate()'s self-check proves each swap on whatever release is installed."""
    installed = installed_transformers()
    if installed is None or in_tested_range(installed):
        return
    import warnings

    from ..errors import HeteroLLMWarning

    warnings.warn(f"hetero_llm was tested with transformers {OLDEST_SUPPORTED} to {NEWEST_TESTED}.x; this is "
                  f"{installed}. accelerate() checks its swaps against this release on a tiny model before "
                  f"changing anything (refusing with SelfCheckError if one differs); to stay on tested ground: "
                  f"pip install \"{tested_requirement()}\"",
                  HeteroLLMWarning, stacklevel=3)


def tested_requirement() -> str:
    """The pip requirement for the tested range, e.g. transformers>=5.17.0,<5.26."""
    return f"transformers>={OLDEST_SUPPORTED},<{_next_series(NEWEST_TESTED)}"


def _next_series(version: str) -> str:
    major, minor = version_tuple(version)
    return f"{major}.{minor + 1}"


def in_tested_range(version: str | None = None) -> bool:
    """Whether `version` (default: the installed one) is a release series this version of
    hetero_llm was tested on."""
    v = version_tuple(version or transformers_version())
    return version_tuple(OLDEST_SUPPORTED) <= v <= version_tuple(NEWEST_TESTED)


# -- the KV cache argument ----------------------------------------------------------------------
# <= 5.24: model, decoder layer and attention forwards take `past_key_values=`; model outputs
#          carry `.past_key_values`; generate() takes `past_key_values=`.
# >= 5.25: they take `cache=` and outputs carry `.cache`; `past_key_values` stays a deprecated alias
#          (a warning, renamed by a decorator) until 5.40, and generate() accepts it until 6.0.
CACHE_ARGUMENTS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=256)
def _forward_cache_argument(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    return "cache" if version_tuple(transformers_version()) >= (5, 25) else "past_key_values"


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword under which `module`'s class (a model, decoder layer or attention module of
    the installed transformers) takes its KV cache; generate() forwards it under the model's name."""
    return _forward_cache_argument(type(module))


def take_cache(kwargs: dict, past_key_values: Any = None) -> Any:
    """The KV cache handed to one of our forwards, under whichever name the caller used;
    both names are removed from `kwargs` (so they are not passed on twice)."""
    found = [kwargs.pop(name, None) for name in CACHE_ARGUMENTS]
    return next((c for c in (*found, past_key_values) if c is not None), None)


def output_cache(output: Any) -> Any:
    """The cache a model forward or generate() returned (`.cache` >= 5.25, `.past_key_values` before)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    for name in CACHE_ARGUMENTS:
        if name in fields:
            return getattr(output, name, None)
    return None


def set_output_cache(output: Any, cache: Any) -> None:
    fields = getattr(type(output), "__dataclass_fields__", {})
    setattr(output, next((n for n in CACHE_ARGUMENTS if n in fields), "past_key_values"), cache)


def causal_lm_output(logits: torch.Tensor, cache: Any):
    """transformers' CausalLMOutputWithPast holding `logits` and `cache`, under the field name
    of the installed release."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = CausalLMOutputWithPast(logits=logits)
    set_output_cache(out, cache)
    return out


def cache_from_pairs(pairs) -> Any:
    """A DynamicCache holding [(keys, values), ...] per layer (5.17-5.25: `ddp_cache_data=`)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(pairs)) if pairs is not None else DynamicCache()


def cache_pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values), ...] of every layer of a transformers Cache (`cache.layers[i].keys`, 5.x)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


# -- static caches -------------------------------------------------------------------------------
# 5.17-5.25: StaticCache(config=, max_cache_len=) builds one StaticLayer per full-attention layer
# (StaticSlidingWindowLayer for sliding ones), allocated at the first update; a StaticLayer's
# `get_seq_length()` is its `cumulative_length`, a tensor on the cache's device once initialized.

def static_cache_class():
    from transformers import StaticCache

    return StaticCache


def static_layer_class():
    from transformers.cache_utils import StaticLayer

    return StaticLayer


def new_static_cache(cls: type, config, max_cache_len: int):
    return cls(config=config, max_cache_len=max_cache_len)


def layer_is_initialized(layer: Any) -> bool:
    return bool(getattr(layer, "is_initialized", False))


def static_layer_length(layer: Any) -> torch.Tensor:
    """Tokens a StaticLayer holds, as a device tensor (no host sync): its `cumulative_length`."""
    length = getattr(layer, "cumulative_length", None)
    return length if isinstance(length, torch.Tensor) else layer.get_seq_length()


def dynamic_cache_class():
    from transformers import DynamicCache

    return DynamicCache


# -- configs ---------------------------------------------------------------------------------------

def text_config(config):
    """The decoder's config (multimodal configs nest it; 5.x: `get_text_config(decoder=True)`)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def rope_type(config) -> str:
    """The rotary scaling type: `rope_parameters` (5.x) or the older `rope_scaling` dict."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict) and params.get("rope_type", params.get("type")):
            return str(params.get("rope_type", params.get("type")))
    return "default"


# -- attention implementations -------------------------------------------------------------------
# 5.17-5.25: `AttentionInterface.register(name, fn)` adds an implementation that models select with
# `model.set_attn_implementation(name)` (recorded in `config._attn_implementation`); the mask
# builder for a name is registered in `masking_utils.AttentionMaskInterface`; SDPA's own function
# lives in `integrations.sdpa_attention`.

def register_attention(name: str, fn) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def sdpa_attention_function():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def attention_implementation(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def can_set_attention(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_attn_implementation")


def supports_attention_implementation(model: torch.nn.Module, name: str) -> bool:
    """Whether `model.set_attn_implementation(name)` is accepted: SDPA where the class declares
    `_supports_sdpa` (Gemma 2 does not: soft-capping), a registered name where it declares
    `_supports_attention_backend` (5.17-5.25)."""
    if not can_set_attention(model):
        return False
    if name == "sdpa":
        return bool(getattr(model, "_supports_sdpa", False))
    if name == "eager":
        return True
    return bool(getattr(model, "_supports_attention_backend", False))


def set_attention_implementation(model: torch.nn.Module, name: str) -> None:
    """Select `name` for this model instance only (transformers raises ValueError for a model
    class that does not take the attention interface)."""
    model.set_attn_implementation(name)


# -- decoder layers --------------------------------------------------------------------------------

def layer_output_hidden(output: Any) -> torch.Tensor:
    """A decoder layer returns its hidden states (5.x), older ones a tuple starting with them."""
    return output[0] if isinstance(output, tuple) else output


def rotary_tables(rotary: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin) from a model's shared rotary embedding module: `rotary(x, position_ids)` (5.x)."""
    return rotary(hidden, position_ids)


# -- loading -----------------------------------------------------------------------------------------
# 5.x: `from_pretrained(dir, gguf_file=name, dtype=...)` reads (and dequantizes) a GGUF file;
# `torch_dtype=` is the pre-5 spelling. The GGUF origin is recorded as config.quantization_config.

def gguf_load_kwargs(file_name: str, dtype: torch.dtype) -> dict:
    return {"gguf_file": file_name, "dtype": dtype}


def checkpoint_renamings(model: torch.nn.Module) -> list:
    """The key renamings transformers applies when it loads this model's checkpoints (5.x:
    `conversion_mapping.get_model_conversion_mapping`, its `WeightRenaming` entries)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's linear layers): its weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, Conv1D)


def looks_like_norm(module: torch.nn.Module) -> bool:
    """A normalization module, by transformers' naming (LlamaRMSNorm, LayerNorm, ...) and a weight:
    how a model without a role table has its norms recognized."""
    return "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor)
