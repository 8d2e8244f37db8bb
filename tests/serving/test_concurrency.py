"""One accelerated model, many threads: every concurrent call returns what it returns alone.

Servers call one model from many threads. Nothing a call leaves behind may reach another:
the KV caches are per call (transformers' DynamicCache, or a hetero_llm.decode session that
serves one call at a time), the fused q/k/v projection matches its cached output to the very
input tensor, and the plan and modules are read-only once accelerate() has returned. These
tests run 8 threads released together against the same calls made one at a time.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm.config import QuantConfig
from concurrency import run_together
from tiny_shapes import TINY_SHAPES

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
THREADS = 8
NEW = 12


def tiny(model_type: str):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **TINY_SHAPES[model_type]})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompts() -> list[torch.Tensor]:
    """Different lengths and batch sizes, so that no two calls could share a cache or a buffer."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 256, (1 + i % 2, 5 + 3 * i), generator=g) for i in range(THREADS)]


def generate(model, x):
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=0)


CONFIGS = {
    "llama int8": ("llama", dict(quantize="int8")),
    "llama int8-asym static decode": ("llama", dict(quantize="int8-asym", decode="static")),
    "llama w8a8": ("llama", dict(quantize=QuantConfig(scheme="w8a8", smooth_alpha=0))),
    "llama fp32 structured": ("llama", dict(quantize="none", prune="structured")),
    "qwen2 int8 static decode": ("qwen2", dict(quantize="int8", decode="static")),
    "opt int8 (fused q/k/v slices)": ("opt", dict(quantize="int8")),
    "gpt2 fp32": ("gpt2", dict(quantize="none")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eight_threads_generate_what_each_call_generates_alone(name):
    model_type, options = CONFIGS[name]
    if options.get("prune") == "structured":
        options = dict(options, prune=hetero_llm.PruneConfig(method="structured", mlp=0.25, criterion="magnitude"))
    model = hetero_llm.accelerate(tiny(model_type), device="cpu", **options)
    xs = prompts()
    alone = [generate(model, x) for x in xs]
    for _ in range(2):  # a second round reuses whatever the first left (sessions, caches)
        together = run_together([lambda x=x: generate(model, x) for x in xs])
        for a, b in zip(together, alone):
            assert torch.equal(a, b)
    if options.get("decode") == "static":
        report = model.hetero_decode.report()
        assert report["eager_steps"] > 0 and not report["fallbacks"]


def test_concurrent_forward_calls_give_the_logits_of_calls_alone():
    model = hetero_llm.accelerate(tiny("opt"), device="cpu", quantize="int8")
    xs = prompts()
    with torch.inference_mode():
        alone = [model(x).logits for x in xs]
        together = run_together([lambda x=x: model(x).logits for x in xs])
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


def test_threads_share_one_plan_and_leave_it_unchanged():
    model = hetero_llm.accelerate(tiny("llama"), device="cpu", quantize="int8")
    before = model.hetero_plan.to_json()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run_together([lambda x=x: generate(model, x) for x in prompts()])
    assert model.hetero_plan.to_json() == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_deep_copy_per_thread_also_works():
    """The other way to serve: one copy per worker (more memory, no sharing at all)."""
    model = hetero_llm.accelerate(tiny("llama"), device="cpu", quantize="int8", decode="static")
    copies = [copy.deepcopy(model) for _ in range(3)]
    xs = prompts()[:3]
    together = run_together([lambda m=m, x=x: generate(m, x) for m, x in zip(copies, xs)])
    for got, x in zip(together, xs):
        assert torch.equal(got, generate(model, x))
