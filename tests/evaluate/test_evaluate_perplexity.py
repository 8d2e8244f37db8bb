"""Perplexity windows, validation and agreement with the model's own loss."""
from __future__ import annotations

import math

import pytest
import torch

from hetero_llm.errors import InvalidOptionError
from hetero_llm.evaluate import PerplexityResult, default_text, perplexity

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def test_default_text_is_large_and_deterministic():
    text = default_text()
    assert len(text) > 200_000 and text == default_text()


def test_window_below_two_is_refused(tiny_model, toy_tokenizer):
    with pytest.raises(InvalidOptionError, match="window"):
        perplexity(tiny_model, toy_tokenizer, TEXT, window=1, progress=False)


def test_text_of_one_token_is_refused(tiny_model, toy_tokenizer):
    with pytest.raises(InvalidOptionError, match="at least 2"):
        perplexity(tiny_model, toy_tokenizer, "x", progress=False)


def test_windows_score_all_but_their_first_token(tiny_model, toy_tokenizer):
    # 100 tokens in windows of 32: 32 + 32 + 32 + 4, each losing its first token.
    result = perplexity(tiny_model, toy_tokenizer, TEXT, max_tokens=100, window=32, progress=False)
    assert isinstance(result, PerplexityResult)
    assert result.tokens == 31 * 3 + 3
    assert math.isclose(result.perplexity, math.exp(result.nll))
    # 97 tokens leave a trailing one-token window with nothing to score.
    assert perplexity(tiny_model, toy_tokenizer, TEXT, max_tokens=97, window=32,
                      progress=False).tokens == 93


def test_one_window_matches_the_model_loss(tiny_model, toy_tokenizer):
    ids = toy_tokenizer(TEXT[:64], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = tiny_model(input_ids=ids, labels=ids).loss.item()
    result = perplexity(tiny_model, toy_tokenizer, TEXT[:64], window=512, progress=False)
    assert result.tokens == 63
    assert result.nll == pytest.approx(loss, rel=1e-5)
    # A random model over 256 ids is close to uniform.
    assert 100 < result.perplexity < 500


def test_default_text_is_used_when_none(tiny_model, toy_tokenizer):
    result = perplexity(tiny_model, toy_tokenizer, max_tokens=64, window=64, progress=False)
    assert result.tokens == 63
