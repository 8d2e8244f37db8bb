"""Greedy decoding without transformers' per-token loop, for the calls that are plain greedy.

With the native CPU step a token of a 135M model takes ~5 ms, and transformers' sampling loop
adds ~1.3 ms per token around it (input preparation, logits processors, three `torch.isin`
stopping checks, attention-mask growth). For a call whose generation settings are all ones this
loop reproduces exactly — greedy, a length limit, end-of-sequence tokens with padding of finished
sequences, min_new_tokens / min_length, a streamer — it runs the same steps itself: the same
logits in fp32, `argmax` (first maximum on ties, as transformers), the same output tensor. Any
other setting (sampling, penalties, stop strings, scores in the output...) is left to transformers'
loop, which still decodes with the session's step; `greedy_problem` names the setting.
"""
from __future__ import annotations


import torch
from torch import nn

from ..integrations import hf_adapter as hf

# Generation settings this loop honours whatever their value (ids and lengths), or that have no
# effect on greedy decoding of one sequence per prompt without an assistant model.
FREE = frozenset({
    "_from_model_config", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
    "decoder_start_token_id", "max_length", "max_new_tokens", "min_length", "min_new_tokens",
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
    "compile_config", "disable_compile", "low_memory", "cache_config", "max_cache_len", "length_penalty",
    "early_stopping", "renormalize_logits", "assistant_confidence_threshold", "assistant_early_exit",
    "assistant_lookbehind", "assistant_ensemble_weight", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "max_matching_ngram_size", "target_lookbehind", "is_assistant", "use_cache", "cache_implementation",
})
# Settings that are fine at their neutral value (None always is); anything else goes to transformers.
NEUTRAL = {
    "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "guidance_scale": 1.0, "diversity_penalty": 0.0,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False,
    "return_dict_in_generate": False, "remove_invalid_values": False, "token_healing": False, "use_mtp": False,
}
# generate() keyword arguments besides the settings that this loop takes.
TAKEN_KWARGS = frozenset({"input_ids", "attention_mask", "streamer", "tokenizer"})


def greedy_problem(config, kwargs: dict, prompt_length: int) -> str | None:
    """Why this call needs transformers' loop (a setting this loop does not reproduce), or None."""
    for key, value in config.to_dict().items():
        if value is None or key in FREE:
            continue
        if key not in NEUTRAL or value != NEUTRAL[key]:
            return f"generation setting {key}={value!r}"
    for key, value in kwargs.items():
        if value is not None and key not in TAKEN_KWARGS and not hasattr(config, key):
            return f"generate() argument {key}"
    if _new_tokens(config, prompt_length) < 1:
        return "no new tokens to generate (max_length within the prompt)"
    return None


def _new_tokens(config, prompt_length: int) -> int:
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return int(config.max_length if config.max_length is not None else 20) - prompt_length


def _eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def greedy_generate(model: nn.Module, runner, session, input_ids: torch.Tensor, config, streamer=None) -> torch.Tensor:
    """(batch, prompt + new) token ids, as transformers' greedy generate() returns them."""
    batch, length = input_ids.shape
    new_tokens = _new_tokens(config, length)
    min_new = max(int(config.min_new_tokens or 0), int(config.min_length or 0) - length)
    eos = _eos_ids(config)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    # The prompt through the model's own forward (every kernel of the plan), filling the session's cache.
    out = type(model).forward(model, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              use_cache=True, logits_to_keep=1, **{hf.cache_argument(model): session.cache})
    logits = out.logits[:, -1, :].to(dtype=torch.float32)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    eos_ids = torch.tensor(eos, device=input_ids.device) if eos else None
    chosen = []
    for step in range(new_tokens):
        if eos and step < min_new:
            logits[:, eos] = -float("inf")
        tokens = logits.argmax(dim=-1)
        if eos and pad is not None:  # finished sequences are padded, as transformers does
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        chosen.append(tokens)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if eos:
            unfinished &= ~(tokens[:, None] == eos_ids).any(dim=1)
            if not bool(unfinished.any()):
                break
        if step + 1 < new_tokens:
            logits = runner.decode(session, tokens[:, None])[:, -1, :].to(dtype=torch.float32)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(chosen, dim=1)], dim=1)
