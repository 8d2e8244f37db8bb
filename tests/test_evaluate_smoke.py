"""The measuring machinery on a tiny random model: bench, report, JSON, chart, errors."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hetero_llm
from hetero_llm.evaluate import (format_table, load_model, perplexity, run_bench, save_chart, save_json,
                                 torch_dynamic_int8, weight_bytes)


class ToyTokenizer:
    """Enough of a tokenizer for the bench: deterministic ids from characters."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        ids = [1 + (ord(c) % 250) for c in text]
        if return_tensors is None:  # like transformers: plain lists without return_tensors
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        t = torch.tensor([ids])
        return {"input_ids": t, "attention_mask": torch.ones_like(t)}


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=0,
                      pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_bench_report_json_and_chart(tiny, tmp_path):
    import copy
    variants = {"original": tiny, "hetero_llm": hetero_llm.accelerate(copy.deepcopy(tiny)),
                "torch-dynamic-int8": torch_dynamic_int8(tiny)}
    result = run_bench(variants, ToyTokenizer(), repeats=2, new_tokens=4, prompt_len=32,
                       perplexity_tokens=256, progress=False, model_name="tiny")
    assert [v.name for v in result.variants] == list(variants)
    assert all(v.decode_tok_s > 0 and v.prefill_tok_s > 0 and v.perplexity > 1 for v in result.variants)
    table = format_table(result)
    assert "hetero_llm vs torch-dynamic-int8" in table
    data = json.loads(save_json(result, tmp_path / "b.json").read_text())
    assert data["baseline"] == "original"
    png = save_chart(result, tmp_path / "b.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_int8_weights_are_about_a_quarter(tiny):
    import copy
    before = weight_bytes(tiny)
    after = weight_bytes(hetero_llm.accelerate(copy.deepcopy(tiny)))
    assert after < 0.5 * before  # the fp32 embedding stays; linears shrink 4x


def test_perplexity_window_is_validated(tiny):
    with pytest.raises(hetero_llm.InvalidOptionError):
        perplexity(tiny, ToyTokenizer(), "some text here", window=1, progress=False)


def test_missing_model_path_is_a_typed_error(tmp_path):
    with pytest.raises(hetero_llm.ModelLoadError):
        load_model(str(tmp_path / "nope"))
