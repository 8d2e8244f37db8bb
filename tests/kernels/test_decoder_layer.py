"""The fused decoder-layer forward (residual adds inside neighbouring kernels), on the torch path.

The Triton path of the same forward runs in test_triton_wiring.py under the interpreter; here
the forward itself is checked: bound to each layer instance, the model's logits, hidden states
and generation are those of transformers' own layer forward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm.fused import decoder_layer
from tiny_shapes import TINY_SHAPES

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def accelerated(model_type: str, backend: str = "torch"):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **TINY_SHAPES[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    hetero_llm.accelerate(model, quantize="none", device="cpu", kernels="auto")
    for layer in model.model.layers:
        for m in layer.modules():
            if hasattr(m, "backend"):
                m.backend = backend  # off the GPU "triton" falls back to the same torch ops
    return model


def ids(seed=0, b=2, s=9):
    return torch.randint(3, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bound_forward_equals_the_layers_own(model_type, backend):
    model = accelerated(model_type, backend)
    x = ids()
    with torch.no_grad():
        before = model(x, output_hidden_states=True)
        for layer in model.model.layers:
            decoder_layer.bind(layer)
            assert decoder_layer.is_bound(layer)
        after = model(x, output_hidden_states=True)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    # transformers records hidden states by the layer's class, which binding keeps
    assert len(after.hidden_states) == len(before.hidden_states) == 3
    for a, b in zip(after.hidden_states, before.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generate_left_padded_and_static_cache_with_bound_layers():
    model = accelerated("llama")
    x = ids(1, b=2, s=7)
    mask = torch.ones_like(x)
    x[0, :3], mask[0, :3] = 0, 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    want = model.generate(x, **kw)
    want_static = model.generate(x, cache_implementation="static", **kw)
    for layer in model.model.layers:
        decoder_layer.bind(layer)
    assert torch.equal(model.generate(x, **kw), want)
    assert torch.equal(model.generate(x, cache_implementation="static", **kw), want_static)


def test_unbind_copy_and_refusal():
    model = accelerated("llama")
    layer = model.model.layers[0]
    decoder_layer.bind(layer)
    twin = copy.deepcopy(model)
    assert decoder_layer.is_bound(twin.model.layers[0])
    assert twin.model.layers[0].forward.__self__ is twin.model.layers[0]  # bound to the copy, not the original
    decoder_layer.unbind(layer)
    assert not decoder_layer.is_bound(layer)
    plain = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("llama", **{**BASE, **TINY_SHAPES["llama"]})).eval()
    with pytest.raises(ValueError, match="Llama-style block"):
        decoder_layer.bind(plain.model.layers[0])  # its parts were never swapped


def test_rms_norm_with_residual_returns_the_sum():
    model = accelerated("llama")
    norm = model.model.layers[0].post_attention_layernorm
    a, r = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    y, s = norm(a, residual=r)
    assert torch.equal(s, a + r)
    assert torch.equal(y, norm(a + r))
