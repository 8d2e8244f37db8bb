"""quantize="none" must not change a single greedy token, for every supported family, with every
cache transformers' generate() uses: a dynamic cache, a static cache and a left-padded batch, through
transformers' loop and through hetero_llm's decode step. This is what broke silently on
transformers 5.25 (the cache argument renamed): run on the oldest and the newest release in CI."""
from __future__ import annotations

import copy

import pytest

import hetero_llm
from tiny_models import FAMILIES, LLAMA_LIKE, assert_same_tokens, tiny_model

@pytest.mark.parametrize("family", FAMILIES)
def test_default_cpu_plan_keeps_every_greedy_token(family):
    original = tiny_model(family)
    accelerated = hetero_llm.accelerate(copy.deepcopy(original), quantize="none")
    assert_same_tokens(original, accelerated)


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_decode_step_keeps_every_greedy_token(family):
    # Mistral's default sliding window would give a sliding static cache, which the step refuses.
    original = tiny_model(family, **({"sliding_window": None} if family == "mistral" else {}))
    accelerated = hetero_llm.accelerate(copy.deepcopy(original), quantize="none", decode="static")
    assert accelerated.hetero_plan.model_settings["decode"] == "static"
    assert_same_tokens(original, accelerated)
    assert accelerated.hetero_decode.report()["eager_steps"] > 0  # the step really ran


def test_sliding_window_shorter_than_the_sequence_keeps_every_greedy_token():
    original = tiny_model("mistral", sliding_window=8)
    accelerated = hetero_llm.accelerate(copy.deepcopy(original), quantize="none")
    assert_same_tokens(original, accelerated)
