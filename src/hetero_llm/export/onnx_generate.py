"""Greedy decoding over an ONNX Runtime session, the KV cache kept in ORT's buffers.

Each step binds the previous step's `present.*` OrtValues as the next `past_key_values.*`
(IOBinding), so the cache is never copied into numpy or torch between steps.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidOptionError


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids from a 0/1 mask as transformers' generate computes them (padding -> 1)."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)

# generate() options that change what is generated and are not implemented here.
_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "streamer": None, "logits_processor": None,
                "stopping_criteria": None, "inputs_embeds": None, "past_key_values": None, "cache": None,
                "return_dict_in_generate": False, "output_scores": False, "output_logits": False}
# Options transformers' generate takes that do not change greedy decoding (sampling knobs are
# unused when do_sample=False, as in transformers).
_IGNORED = ("use_cache", "temperature", "top_k", "top_p", "synced_gpus", "repetition_penalty")


def _check_options(do_sample: bool, kwargs: dict) -> None:
    if do_sample:
        raise InvalidOptionError("OnnxCausalLM.generate decodes greedily (do_sample=False); for sampling, call "
                                 "forward() in a loop and sample from its logits.")
    for name, default in _UNSUPPORTED.items():
        if kwargs.get(name, default) != default:
            raise InvalidOptionError(f"OnnxCausalLM.generate does not support {name}={kwargs[name]!r}; it runs "
                                     "greedy decoding of one sequence per prompt.")
    if kwargs.get("repetition_penalty", 1.0) not in (None, 1.0):
        raise InvalidOptionError("OnnxCausalLM.generate has no repetition_penalty; leave it at 1.0.")
    unknown = set(kwargs) - set(_UNSUPPORTED) - set(_IGNORED) - {"pad_token_id", "eos_token_id",
                                                                   "generation_config", "max_length"}
    if unknown:
        raise InvalidOptionError(f"OnnxCausalLM.generate does not take {sorted(unknown)}.")


def _ids_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _settings(model, prompt_len: int, max_new_tokens, kwargs) -> tuple[int, list[int], int]:
    """(new tokens at most, eos ids, pad id), from the arguments, then the generation config."""
    gen = kwargs.get("generation_config") or model.generation_config
    eos = _ids_list(kwargs.get("eos_token_id", gen.eos_token_id))
    pad = kwargs.get("pad_token_id", gen.pad_token_id)
    pad = int(pad if pad is not None else (eos[0] if eos else 0))
    if max_new_tokens is None:
        max_new_tokens = gen.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = int(kwargs.get("max_length") or gen.max_length or 20) - prompt_len
    if max_new_tokens < 1:
        raise InvalidOptionError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return int(max_new_tokens), eos, pad


class _Stepper:
    """One graph call per token; holds the presents for the next call.

    The prompt runs through session.run, which can feed the optional `logits_to_keep` (only
    the last position's logits are computed); the steps after it bind the previous presents
    as OrtValues (IOBinding cannot bind an optional input, and one token needs none).
    """

    def __init__(self, model) -> None:
        self.model = model
        self.binding = model.session.io_binding()
        self.past = None  # numpy arrays after the prompt, then OrtValues

    def prompt(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        feed = self.model._feed(ids, mask, pos, None, logits_to_keep=1)
        outs = self.model.session.run(None, feed)
        self.past = outs[1:]
        return outs[0][:, -1, :]

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            b.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name, value in zip(self.model._past, self.past):
            if isinstance(value, np.ndarray):
                b.bind_cpu_input(name, value)
            else:
                b.bind_ortvalue_input(name, value)
        b.bind_output("logits", "cpu")
        for name in self.model._present:
            b.bind_output(name, "cpu")
        self.model.session.run_with_iobinding(b)
        outs = b.get_outputs()
        self.past = list(outs[1:])
        return outs[0].numpy()[:, -1, :]


def greedy(model, input_ids: torch.Tensor, *, max_new_tokens=None, min_new_tokens: int = 0,
           do_sample: bool = False, attention_mask=None, **kwargs) -> torch.Tensor:
    """Greedy tokens after `input_ids` (batch, prompt): see OnnxCausalLM.generate."""

    _check_options(do_sample, kwargs)
    ids = input_ids.detach().cpu().numpy().astype(np.int64)
    n_new, eos, pad = _settings(model, ids.shape[1], max_new_tokens, kwargs)
    mask = (np.ones_like(ids) if attention_mask is None
            else attention_mask.detach().cpu().numpy().astype(np.int64))
    stepper = _Stepper(model)
    logits = stepper.prompt(ids, mask, positions(mask))
    done = np.zeros(ids.shape[0], dtype=bool)
    out = [ids]
    for step in range(n_new):
        if step < min_new_tokens and eos:
            logits[:, eos] = -np.inf  # as transformers' MinNewTokensLengthLogitsProcessor
        token = np.where(done, pad, logits.argmax(axis=-1)).astype(np.int64)
        out.append(token[:, None])
        done |= np.isin(token, eos)
        if done.all() or step == n_new - 1:
            break
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=np.int64)], axis=1)
        pos = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        logits = stepper.step(token[:, None], mask, pos)
    return torch.from_numpy(np.concatenate(out, axis=1))
