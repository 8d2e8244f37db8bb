"""A tiny model of the same architecture as a given config: two layers, small widths, the same
attention, rotary, norm and cache settings. The self-check runs hetero_llm's swaps on it."""
from __future__ import annotations

import copy

import torch

# Sizes shrunk wherever a config has them (as ints); everything else is kept as the model has it.
# Heads are chosen so every width stays consistent: 4 heads of 16 in a hidden size of 64.
TINY_SIZES = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2,
    "num_attention_heads": 4, "n_head": 4,
    "head_dim": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1,
    # rotary and latent-attention widths, which must fit inside the tiny heads
    "d_head": 16, "rotary_dim": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "kv_lora_rank": 32, "q_lora_rank": 32,
    "vocab_size": 512,
}
# Special tokens outside the tiny vocabulary are moved into it (configs validate them as ints).
TINY_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}
TINY_LAYERS = 2
TINY_WINDOW = 8  # a sliding window shorter than the self-check's sequences, so windows are exercised
# Larger than transformers' usual 0.02, so a tiny random model's logits are far apart and a wrong
# swap shows as a clear difference rather than a near-tie.
TINY_INIT_RANGE = 0.1


def _kv_heads(original: int | None, heads: int | None) -> int | None:
    if original is None or heads is None:
        return original
    if original == heads:
        return TINY_SIZES["num_attention_heads"]
    return 1 if original == 1 else 2  # grouped-query attention stays grouped


def _layer_types(types: list, layers: int) -> list:
    """The first layer of each kind, in order, then repeated: a tiny model keeps every kind."""
    kinds = list(dict.fromkeys(types))[:layers]
    return (kinds * layers)[:layers]


# Nested configs of composite models (the text decoder of a multimodal model, its encoders), shrunk alike.
NESTED = ("text_config", "vision_config", "audio_config", "decoder_config")


def _per_layer_lists(d: dict) -> None:
    """Settings given once per layer (block types, limits, window sizes) keep their first layers."""
    layers = next((d[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(d.get(k), int)), None)
    if not layers or layers <= TINY_LAYERS:
        return
    for key, value in d.items():
        if key != "layer_types" and isinstance(value, list) and len(value) == layers:
            d[key] = value[:TINY_LAYERS]
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # per-layer overrides
            d[key] = {k: v for k, v in value.items() if int(k) < TINY_LAYERS}


def _shrink(d: dict) -> dict:
    heads = d.get("num_attention_heads", d.get("n_head"))
    _per_layer_lists(d)
    for key, size in TINY_SIZES.items():
        if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
            d[key] = size
    if isinstance(d.get("num_key_value_heads"), int):
        d["num_key_value_heads"] = _kv_heads(d["num_key_value_heads"], heads)
    if isinstance(d.get("layer_types"), list) and d["layer_types"]:
        d["layer_types"] = _layer_types(d["layer_types"], TINY_LAYERS)
    if isinstance(d.get("sliding_window"), int):
        d["sliding_window"] = min(d["sliding_window"], TINY_WINDOW)
    vocab = d.get("vocab_size", TINY_SIZES["vocab_size"])
    for key, inside in TINY_SPECIAL_IDS.items():
        ids = d.get(key)
        if isinstance(ids, list):
            d[key] = [i for i in ids if isinstance(i, int) and i < vocab] or [inside]
        elif isinstance(ids, int) and ids >= vocab:
            d[key] = inside
    if "initializer_range" in d:
        d["initializer_range"] = TINY_INIT_RANGE
    for key in NESTED:
        if isinstance(d.get(key), dict):
            d[key] = _shrink(d[key])
    return d


def _finish(d: dict, config):
    d["use_cache"] = True
    d.pop("_attn_implementation_autoset", None)
    d.pop("attn_implementation", None)  # transformers' default for the class (a GPU-only choice may not run here)
    return type(config).from_dict(d)


def tiny_config(config):
    """A copy of `config` with TINY_SIZES, two layers (of every layer kind it has), a short sliding
    window, special tokens inside the small vocabulary and the KV cache on."""
    return _finish(_shrink(config.to_dict()), config)


def _fewer_layers(d: dict) -> dict:
    _per_layer_lists(d)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(d.get(key), int) and d[key] > TINY_LAYERS:
            d[key] = TINY_LAYERS
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][:TINY_LAYERS]
    if isinstance(d.get("vocab_size"), int):
        d["vocab_size"] = TINY_SIZES["vocab_size"]
    for key, inside in TINY_SPECIAL_IDS.items():
        if isinstance(d.get(key), int) and d[key] >= TINY_SIZES["vocab_size"]:
            d[key] = inside
    for key in NESTED:
        if isinstance(d.get(key), dict):
            d[key] = _fewer_layers(d[key])
    return d


def layers_only_config(config):
    """Where TINY_SIZES break a config's own rules (widths tied to each other in ways no table can
    know): its real widths, two layers (the first two of every per-layer setting), a small vocabulary."""
    return _finish(_fewer_layers(config.to_dict()), config)


class TinyModelError(Exception):
    """No small model of this config could be built (both ways failed, or it would be too large)."""


def _params_on_meta(model_class: type, config) -> int:
    with torch.device("meta"):  # sized before anything is allocated
        return sum(p.numel() for p in model_class(config).parameters())


def tiny_model(model_class: type, config, seed: int = 0, max_params: int = 50_000_000) -> torch.nn.Module:
    """A randomly initialised fp32 `model_class` of `tiny_config(config)` (else `layers_only_config`,
    if under `max_params`), in eval mode, on the CPU. Raises TinyModelError naming both failures."""
    errors = []
    for shrink in (tiny_config, layers_only_config):
        try:
            small = shrink(copy.deepcopy(config))
            params = _params_on_meta(model_class, small)
            if params > max_params:
                raise TinyModelError(f"{params / 1e6:.0f}M parameters with {TINY_LAYERS} layers")
            torch.manual_seed(seed)
            with torch.device("cpu"):
                model = model_class(small)
            return model.float().eval()
        except Exception as e:  # noqa: BLE001 - a config's own validation of the shrunk sizes
            errors.append(f"{shrink.__name__}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    raise TinyModelError("; ".join(errors))
