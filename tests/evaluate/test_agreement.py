"""Greedy-token agreement with the original, and the bars bench/eval hold the accelerated model to."""
from __future__ import annotations

import copy

import pytest
import torch

import hetero_llm
from hetero_llm import cli
from hetero_llm.errors import AccuracyError
from hetero_llm.evaluate import BenchResult, VariantResult, format_table, run_bench
from hetero_llm.evaluate.agreement import AGREEMENT_FLOOR, Agreement, agreement, greedy_tokens, verdict

from tiny_models import tiny_model

PROMPT = torch.tensor([[5, 17, 33, 60, 91, 120, 7]])


def test_a_copy_agrees_exactly():
    model = tiny_model("llama")
    ref = greedy_tokens(model, PROMPT, 24)
    got = agreement(copy.deepcopy(model), PROMPT, ref)
    assert got == Agreement(identical=True, agreement=1.0, first_difference=None, tokens=24)
    assert got.describe() == "identical"


def test_the_accelerated_model_agrees_through_its_kv_cache():
    model = tiny_model("llama")
    ref = greedy_tokens(model, PROMPT, 24)
    assert agreement(hetero_llm.accelerate(copy.deepcopy(model), quantize="none"), PROMPT, ref).identical


class _WriteOnly:
    """A KV cache that stores the new keys but hands back only them: attention sees the new tokens alone."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, k, v, *args, **kwargs):
        self.cache.update(k, v, *args, **kwargs)
        return k, v


def test_a_model_that_does_not_read_its_cache_is_caught():
    """What perplexity (no cache) cannot see: every prompt logit right, every generated token wrong."""
    from hetero_llm.integrations import hf_adapter as hf

    model = tiny_model("llama")
    ref = greedy_tokens(model, PROMPT, 24)
    broken = copy.deepcopy(model)
    for layer in broken.model.layers:
        def forward(*a, _f=layer.self_attn.forward, **k):
            cache = hf.take_cache(k)
            return _f(*a, **k, **({hf.cache_argument(model): _WriteOnly(cache)} if cache is not None else {}))
        layer.self_attn.forward = forward
    with torch.no_grad():
        assert torch.equal(broken(PROMPT).logits, model(PROMPT).logits)
    got = agreement(broken, PROMPT, ref)
    assert not got.identical and got.agreement < 0.5 and got.first_difference is not None


def test_verdicts():
    same = Agreement(True, 1.0, None, 128)
    close = Agreement(False, 0.96, 8, 128)
    low = Agreement(False, AGREEMENT_FLOOR - 0.01, 3, 128)
    assert verdict(same, "none") is None and verdict(close, "int8") is None
    assert "exactly" in verdict(close, "none") and "floor" in verdict(low, "int8")
    assert verdict(low, "int8", pruned=True) is None  # pruning is judged by perplexity


def test_bench_reports_agreement_and_a_failure_is_not_a_speedup(toy_tokenizer):
    variants = {"original": tiny_model("llama", seed=0), "hetero_llm": tiny_model("llama", seed=1)}
    result = run_bench(variants, toy_tokenizer, repeats=1, new_tokens=4, prompt_len=16, perplexity_tokens=None,
                       progress=False)
    other = result.variant("hetero_llm")
    assert other.tokens_identical is False and other.token_agreement < AGREEMENT_FLOOR
    assert result.variant("original").tokens_identical is True
    other.accuracy_failure = "token agreement under the floor"
    table = format_table(result)
    row = next(line for line in table.splitlines() if line.startswith("hetero_llm"))
    assert "FAIL" in row and "x " not in row.split("FAIL")[0][-3:]
    assert "hetero_llm: FAILED: token agreement under the floor" in table
    assert BenchResult.from_dict(result.to_dict()) == result


def test_old_results_without_agreement_still_load():
    v = VariantResult("a", 1.0, 1.0, [1.0], [1.0], 1.0, 0.0, None)
    assert v.tokens_identical is None and "-" in format_table(BenchResult("m", [v]))


def test_cli_refuses_to_call_wrong_output_a_speedup(make_tiny, monkeypatch):
    model = hetero_llm.accelerate(make_tiny(), quantize="none")
    args = cli.build_parser().parse_args(["eval", "x", "--prune", "none"])
    with pytest.raises(AccuracyError):
        cli._refuse_if_failed(cli._judge(model, Agreement(False, 0.99, 5, 128), args))
    assert cli._judge(model, Agreement(True, 1.0, None, 128), args) is None
