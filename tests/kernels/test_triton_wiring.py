"""accelerate(kernels="triton") end to end: the Triton kernels inside real transformers models.

Runs under Triton's interpreter on CPU (see triton_helpers; in the main test process, where
transformers imported triton first, `test_kernels_in_a_fresh_process` reruns this file in a
child). On a GPU the same tests run the compiled kernels. Every family is covered: Llama-style
blocks get RotaryAttention + fused decoder layers (linear_add, add+RMSNorm); GPT-2, OPT and
Phi-3 reach the kernels through transformers' attention interface.
"""
from __future__ import annotations

# isort: off
from triton_helpers import DEVICE, ON_GPU, run_file_in_fresh_process, runs_kernels
# isort: on
import collections
import copy
import importlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
# The modules (hetero_llm.kernels exports functions of the same names)
A, D, L, R = (importlib.import_module(f"hetero_llm.kernels.{m}")
              for m in ("attention", "decode_attention", "linear_add", "rms_norm"))
from tiny_shapes import TINY_SHAPES

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_STYLE = ("llama", "mistral", "qwen2", "gemma")
FAMILIES = LLAMA_STYLE + ("phi3", "gpt2", "opt")
ATOL = 2e-4  # fp32 logits: flash attention's online softmax sums in a different order


def pair(model_type: str, **accelerate_options):
    """(reference model with transformers' SDPA, the same weights accelerated with kernels='triton')."""
    cfg = AutoConfig.for_model(model_type, **{**BASE, **TINY_SHAPES[model_type]})
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval().to(DEVICE)
    ours = hetero_llm.accelerate(copy.deepcopy(ref), kernels="triton", device=DEVICE.type,
                                 **{"quantize": "none", **accelerate_options})
    return ref, ours


@pytest.fixture
def calls(monkeypatch):
    """Counts the launches of each Triton launcher while a test runs."""
    counts = collections.Counter()
    for module, name in ((A, "attention_triton"), (D, "decode_attention_triton"),
                         (L, "linear_add_triton"), (R, "rms_norm_triton")):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return counts


def ids(b=2, s=11, seed=0):
    return torch.randint(3, 256, (b, s), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@runs_kernels
@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_match_transformers(model_type, calls):
    ref, ours = pair(model_type)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=ATOL, rtol=1e-4)
    assert calls["attention_triton"] >= 2  # one per layer
    if model_type in LLAMA_STYLE:
        assert calls["rms_norm_triton"] >= 5 and calls["linear_add_triton"] >= 4
        assert type(ours.model.layers[0].self_attn).__name__ == "RotaryAttention"
    else:
        assert ours.config._attn_implementation == "hetero_llm"


@runs_kernels
@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generate_matches_with_left_padding(model_type, calls):
    ref, ours = pair(model_type)
    x = ids(b=3, s=9, seed=1)
    mask = torch.ones_like(x)
    x[0, :4], mask[0, :4] = BASE["pad_token_id"], 0  # left padding
    x[1, :1], mask[1, :1] = BASE["pad_token_id"], 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))


@runs_kernels
@pytest.mark.parametrize("model_type", ["llama", "gemma", "gpt2"])
def test_unpadded_decode_uses_split_kv_and_static_cache_works(model_type, calls):
    ref, ours = pair(model_type, decode="transformers")  # every step through the launchers, to count them
    x = ids(b=2, s=8, seed=2)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))
    assert calls["decode_attention_triton"] >= 4 * 2  # tokens after the first x layers
    want = ref.generate(x, cache_implementation="static", **kw)
    assert torch.equal(ours.generate(x, cache_implementation="static", **kw), want)


@runs_kernels
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_static_decode_step_with_triton_kernels(quantize, calls):
    """hetero_llm.decode's step (a CUDA graph on the GPU) on the Triton-wired blocks: the fused
    layer forward hands the cache lengths to the split-KV kernel."""
    ref, ours = pair("llama", quantize=quantize, decode="static")
    x = ids(b=2, s=8, seed=3)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    want = hetero_llm.accelerate(copy.deepcopy(ref), quantize=quantize, kernels="triton", device=DEVICE.type,
                                 decode="transformers").generate(x, **kw)
    assert torch.equal(ours.generate(x, **kw), want)
    assert ours.hetero_decode.report()["eager_steps"] == 4
    assert calls["rms_norm_triton"] > 0
    if ON_GPU:  # the interpreter's CPU tensors take the torch decode path
        assert calls["decode_attention_triton"] >= 4 * 2
        graph = hetero_llm.accelerate(copy.deepcopy(ref), quantize=quantize, kernels="triton", device="cuda",
                                      decode="cuda_graph")
        assert torch.equal(graph.generate(x, **kw), want)
        assert graph.hetero_decode.report()["graphs"] == 1


@runs_kernels
def test_int8_with_triton_kernels_fuses_the_residual_into_the_norm(calls):
    ref, ours = pair("llama", quantize="int8")
    plain = hetero_llm.accelerate(copy.deepcopy(ref), quantize="int8", kernels="torch", device=DEVICE.type)
    x = ids()
    with torch.no_grad():
        got, want, exact = ours(x).logits, plain(x).logits, ref(x).logits
    # kernels="torch" also picks the reference INT8 matmul (the triton plan takes the fast CPU
    # or GPU one), so the two differ by INT8 rounding noise: well under the INT8 error itself.
    assert (got - want).abs().max() <= 0.5 * (want - exact).abs().max()
    assert ours.hetero_plan.entry("model.layers.0.post_attention_layernorm").kernel == "triton-add_rms_norm"
    assert calls["linear_add_triton"] == 0  # o and down are INT8: their adds went to the norm / a plain add
    assert calls["rms_norm_triton"] >= 5


@runs_kernels
def test_save_load_keeps_the_triton_wiring(tmp_path):
    ref, ours = pair("llama")
    hetero_llm.save(ours, tmp_path / "m")
    back = hetero_llm.load(tmp_path / "m")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x).logits, atol=0, rtol=0)
    assert back.model.layers[0].self_attn.backend == "triton"


@pytest.mark.skipif(ON_GPU, reason="the GPU runs these tests in this process")
def test_kernels_in_a_fresh_process():
    run_file_in_fresh_process(__file__)
