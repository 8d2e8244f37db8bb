"""Interleaved bench: medians, ratios, rotation, JSON round trip, validation."""
from __future__ import annotations

import json
import statistics

import pytest

from hetero_llm.errors import InvalidOptionError
from hetero_llm.evaluate import BenchResult, bench, run_bench


def test_two_tiny_variants(make_tiny, toy_tokenizer):
    variants = {"a": make_tiny(seed=0), "b": make_tiny(seed=1)}
    result = run_bench(variants, toy_tokenizer, repeats=2, new_tokens=4, prompt_len=32,
                       perplexity_tokens=128, progress=False, model_name="tiny")
    assert result.baseline == "a" and [v.name for v in result.variants] == ["a", "b"]
    for v in result.variants:
        assert len(v.decode_runs) == len(v.prefill_runs) == 2
        assert v.decode_tok_s == statistics.median(v.decode_runs) > 0
        assert v.prefill_tok_s == statistics.median(v.prefill_runs) > 0
        assert v.weight_mb > 0 and v.peak_rss_delta_mb >= 0
        assert 100 < v.perplexity < 500
    assert result.ratio("a", "decode_tok_s") == 1.0
    b = result.variant("b")
    assert result.ratio("b", "prefill_tok_s") == pytest.approx(b.prefill_tok_s / result.variants[0].prefill_tok_s)
    assert result.ratio("a", "perplexity", against="b") == pytest.approx(result.variants[0].perplexity / b.perplexity)
    settings = result.settings
    assert settings["repeats"] == 2 and settings["prompt_len"] == 32 and settings["threads"] >= 1
    assert {"torch", "transformers", "ppl_tokens", "new_tokens"} <= set(settings)
    again = BenchResult.from_dict(json.loads(result.to_json()))
    assert again == result


def test_rounds_rotate_the_order(monkeypatch, make_tiny, toy_tokenizer):
    order = []
    monkeypatch.setattr(bench, "measure_decode", lambda m, ids, n: order.append(m.tag) or 0.5)
    monkeypatch.setattr(bench, "measure_prefill", lambda m, ids: 0.25)
    variants = {}
    for tag in "xyz":
        variants[tag] = make_tiny()
        variants[tag].tag = tag
    result = run_bench(variants, toy_tokenizer, repeats=3, new_tokens=4, prompt_len=8,
                       warmup=1, perplexity_tokens=None, progress=False)
    assert order == list("xyz") + list("xyz") + list("yzx") + list("zxy")  # warmup, then rounds
    v = result.variant("y")
    assert v.decode_tok_s == 8.0 and v.prefill_tok_s == 32.0 and v.perplexity is None
    assert result.ratio("y", "perplexity") is None


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"new_tokens": 0}, {"prompt_len": 0}, {"warmup": -1}])
def test_bad_settings_are_refused(kwargs, tiny_model, toy_tokenizer):
    with pytest.raises(InvalidOptionError):
        run_bench({"a": tiny_model}, toy_tokenizer, progress=False, **kwargs)


def test_no_variants_and_unknown_names_are_refused(toy_tokenizer):
    with pytest.raises(InvalidOptionError):
        run_bench({}, toy_tokenizer, progress=False)
    result = BenchResult("m", [], {})
    with pytest.raises(InvalidOptionError, match="no variant named"):
        result.ratio("nope", "decode_tok_s")
    with pytest.raises(InvalidOptionError, match="unknown metric"):
        result.ratio("nope", "speed")
