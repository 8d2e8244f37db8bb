"""Perplexity over non-overlapping windows, the accuracy half of every benchmark.

Non-overlapping windows (rather than a sliding stride) keep the cost linear and the
number identical across runs and variants, which is all a before/after comparison needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError


def default_text() -> str:
    """A fixed English/Python corpus that ships with CPython: the pydoc topic help.

    It needs no download and is the same on every machine with the same Python
    (about 113k tokens with the SmolLM2 tokenizer).
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity ``exp(nll)``, mean negative log-likelihood per token, tokens scored."""

    perplexity: float
    nll: float
    tokens: int


def _token_ids(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    # Tokenize the whole text once so window boundaries do not depend on how
    # the text would be split into strings.
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids.to(torch.long)


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU when it has none)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # fully quantized peers may hold no nn.Parameter at all
        return torch.device("cpu")


def _window_nll(model, window_ids: torch.Tensor) -> float:
    """Summed NLL of tokens 1..n-1 of one window given its own prefix."""
    out = model(input_ids=window_ids.unsqueeze(0), use_cache=False)
    logits = out.logits[0, :-1].float()
    targets = window_ids[1:]
    # Per-token losses are summed in fp64 so long texts do not lose precision.
    return float(F.cross_entropy(logits, targets, reduction="none").double().sum())


def perplexity(
    model,
    tokenizer,
    text: str | None = None,
    *,
    max_tokens: int | None = 8192,
    window: int = 512,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: :func:`default_text`).

    The text is tokenized once, cut to ``max_tokens`` and split into non-overlapping
    windows of ``window`` tokens. Each window scores its own tokens 1..n-1 given the
    prefix inside the window; its first token is not scored. NLL is summed in fp64.
    """
    from tqdm.auto import tqdm

    if window < 2:
        raise InvalidOptionError(f"window must be at least 2 tokens, got {window}")
    if max_tokens is not None and max_tokens < 2:
        raise InvalidOptionError(f"max_tokens must be at least 2 (or None), got {max_tokens}")
    ids = _token_ids(tokenizer, default_text() if text is None else text, max_tokens)
    if ids.numel() < 2:
        raise InvalidOptionError(
            f"the text gives {ids.numel()} token(s); perplexity needs at least 2"
        )
    ids = ids.to(model_device(model))
    # A trailing window of one token has nothing to score, so it is dropped.
    starts = [s for s in range(0, ids.numel(), window) if ids.numel() - s >= 2]
    total, scored = 0.0, 0
    with torch.inference_mode():
        for start in tqdm(starts, desc="perplexity", unit="win", disable=not progress):
            chunk = ids[start : start + window]
            total += _window_nll(model, chunk)
            scored += chunk.numel() - 1
    nll = total / scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=scored)


def calibration_samples(tokenizer, n: int = 16, seq_len: int = 256, text: str | None = None,
                        skip_tokens: int = 16384) -> list[torch.Tensor]:
    """`n` token windows of `seq_len` for W8A8 calibration, taken after the first
    `skip_tokens` tokens so they never overlap the perplexity text (the first 8192)."""
    if n < 1 or seq_len < 1:
        raise InvalidOptionError("calibration_samples needs n >= 1 and seq_len >= 1")
    ids = _token_ids(tokenizer, text if text is not None else default_text(), None)
    ids = ids[skip_tokens:] if ids.numel() >= skip_tokens + n * seq_len else ids
    if ids.numel() < n * seq_len:
        raise InvalidOptionError(f"the text has {ids.numel()} tokens; {n} samples of {seq_len} need more")
    return [ids[i * seq_len:(i + 1) * seq_len].reshape(1, -1) for i in range(n)]
