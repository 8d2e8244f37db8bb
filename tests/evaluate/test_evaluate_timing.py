"""Weight bytes, peak RSS, decode and prefill timing, prompt construction."""
from __future__ import annotations

import time

import pytest
import torch

from hetero_llm.errors import HeteroLLMError
from hetero_llm.evaluate import (
    PeakRSS,
    chat_prompt_ids,
    default_text,
    measure_decode,
    measure_prefill,
    prompt_ids,
    torch_dynamic_int8,
    weight_bytes,
)


def _linear_numel(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_tied_weights_count_once(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    unique = sum(p.numel() * 4 for p in tiny_model.parameters())  # parameters() dedups ties
    buffers = sum(b.numel() * b.element_size() for b in tiny_model.buffers())
    assert weight_bytes(tiny_model) == unique + buffers


def test_int8_buffers_count_one_byte_each():
    module = torch.nn.Module()
    module.register_buffer("q", torch.zeros(1000, dtype=torch.int8))
    module.register_buffer("s", torch.zeros(10, dtype=torch.float32))
    assert weight_bytes(module) == 1000 + 40


def test_dynamic_int8_linears_are_a_quarter(make_tiny):
    # Untied so lm_head is a Linear of its own, as quantize_dynamic sees it.
    model = make_tiny(vocab_size=256)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    linear_fp32 = _linear_numel(model) * 4
    rest = weight_bytes(model) - linear_fp32
    quantized = torch_dynamic_int8(model)
    linear_q = weight_bytes(quantized) - rest
    assert linear_q == pytest.approx(linear_fp32 / 4, rel=0.02)


def test_peak_rss_sees_a_200mb_allocation():
    with PeakRSS() as rss:
        block = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB, every page touched
        # The sampling thread must see it while it is resident; on a loaded machine the thread
        # may not run during the ~50 ms the allocation takes, so give it up to 5 s.
        deadline = time.monotonic() + 5
        while rss.peak_bytes < rss.start_bytes + 150e6 and time.monotonic() < deadline:
            time.sleep(0.01)
        del block
    assert rss.start_bytes > 0
    assert rss.delta_bytes > 150e6
    assert rss.peak_bytes == rss.start_bytes + rss.delta_bytes


def test_measure_decode_and_prefill(tiny_model, toy_tokenizer):
    ids = chat_prompt_ids(toy_tokenizer)
    assert ids.dtype == torch.long and ids.shape[0] == 1 and ids.shape[1] > 5
    assert measure_decode(tiny_model, ids, new_tokens=5) > 0
    assert measure_prefill(tiny_model, prompt_ids(toy_tokenizer, 64)) > 0


def test_decode_that_stops_early_is_an_error(toy_tokenizer):
    class Short(torch.nn.Module):
        def generate(self, input_ids, **_):
            return torch.cat([input_ids, input_ids[:, :1]], dim=1)  # one token, not four

    with pytest.raises(HeteroLLMError, match="1 new tokens instead of 4"):
        measure_decode(Short(), chat_prompt_ids(toy_tokenizer), new_tokens=4)


def test_prefill_asks_for_last_logits_only():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, input_ids=None, use_cache=None, logits_to_keep=0):
            seen.update(use_cache=use_cache, logits_to_keep=logits_to_keep)

    measure_prefill(Recorder(), torch.zeros(1, 8, dtype=torch.long))
    assert seen == {"use_cache": False, "logits_to_keep": 1}


def test_prompt_ids_exact_length_and_deterministic(toy_tokenizer):
    for length in (1, 17, 512):
        ids = prompt_ids(toy_tokenizer, length)
        assert ids.shape == (1, length) and ids.dtype == torch.long
    assert torch.equal(prompt_ids(toy_tokenizer, 512), prompt_ids(toy_tokenizer, 512))


@pytest.mark.slow
def test_prompt_ids_with_the_real_tokenizer(smollm2_loaded):
    _, tokenizer, _ = smollm2_loaded
    ids = prompt_ids(tokenizer, 512)
    assert ids.shape == (1, 512)
    # The cut is a prefix of tokenizing the text as a whole: no word split at the boundary.
    whole = tokenizer(default_text()[:20_000], add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == whole[:512]
