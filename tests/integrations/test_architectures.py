"""End-to-end accelerate() on tiny random-weight models of every supported family.

Each family is built from a config (no hub access), accelerated, and compared with
the original model: exactly (fusions only) or loosely (INT8 weights, bf16 activations).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import hetero_llm
from hetero_llm.config import QuantConfig
from hetero_llm.errors import UnsupportedArchitectureError
from hetero_llm.fused.modules import (FusedProjection, GatedMLP, ProjectionSlice, RMSNorm,
                                        RotaryAttention)
from hetero_llm.quant import Int8Linear
from hetero_llm.quant.embedding import Int8Embedding, TiedInt8Linear

# Tolerances, in one place.
# quantize="none": only fusions, which do the same fp32 math in fewer ops.
FUSED_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4),
             torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
             torch.float16: dict(atol=5e-3, rtol=5e-3)}
# INT8 weights with bf16 activations: logits agree in direction and to a few % of their scale.
INT8_MIN_COSINE = 0.99
INT8_MAX_REL_ERR = 5e-2  # max |logit difference| / max |logit|

from tiny_models import (FAMILIES, LLAMA_LIKE, NEW_TOKENS, VOCAB, left_padded_batch, prompt,
                         tiny_model)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def greedy(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    # min_new_tokens keeps a random model from stopping early on eos.
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kw)


def accelerated_copy(model: nn.Module, **options) -> nn.Module:
    return hetero_llm.accelerate(copy.deepcopy(model), **options)


def assert_int8_close(got: torch.Tensor, want: torch.Tensor) -> None:
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert cos > INT8_MIN_COSINE, f"cosine {cos}"
    assert rel < INT8_MAX_REL_ERR, f"max relative error {rel}"
    # Greedy choices agree up to near-ties: the token the INT8 model picks is, for the
    # original model, within the error bound of its best token.
    picked = want.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
    slack = INT8_MAX_REL_ERR * want.abs().max()
    assert (picked >= want.amax(-1) - slack).all()


# -- quantize="none": fusions only, must match the original model -------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_fusions_only_match_original_logits(family):
    ref = tiny_model(family)
    acc = accelerated_copy(ref, quantize="none")
    ids = torch.cat([prompt(12, 1), prompt(12, 2)])
    assert not any(isinstance(m, Int8Linear) for m in acc.modules())
    torch.testing.assert_close(logits(acc, ids), logits(ref, ids), **FUSED_TOL[torch.float32])


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_fusions_only_under_inference_mode(family):
    ref = tiny_model(family)
    acc = accelerated_copy(ref, quantize="none")
    ids = torch.cat([prompt(12, 1), prompt(12, 2)])
    with torch.inference_mode():
        got = acc(ids).logits
    torch.testing.assert_close(got, logits(ref, ids), **FUSED_TOL[torch.float32])


@pytest.mark.parametrize("family", FAMILIES)
def test_fusions_only_chunked_prefill_with_cache_matches_full_forward(family):
    # Second chunk: several new tokens against a non-empty cache (query length != key length).
    ref = tiny_model(family)
    acc = accelerated_copy(ref, quantize="none")
    ids = prompt(10, 3)
    with torch.no_grad():
        cache = DynamicCache(config=acc.config)
        first = acc(ids[:, :6], past_key_values=cache, use_cache=True).logits
        second = acc(ids[:, 6:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), logits(ref, ids), **FUSED_TOL[torch.float32])


@pytest.mark.parametrize("family", FAMILIES)
def test_fusions_only_padded_batch_generation_matches_original(family):
    ref = tiny_model(family)
    acc = accelerated_copy(ref, quantize="none")
    ids, mask = left_padded_batch(prompt(10, 4), prompt(6, 5))
    assert torch.equal(greedy(acc, ids, attention_mask=mask), greedy(ref, ids, attention_mask=mask))


# -- default plan on CPU: INT8 weights -------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_int8_logits_close_to_original(family):
    ref = tiny_model(family)
    acc = accelerated_copy(ref)
    assert any(isinstance(m, Int8Linear) for m in acc.modules())
    ids = torch.cat([prompt(12, 1), prompt(12, 2)])
    assert_int8_close(logits(acc, ids), logits(ref, ids))
    # single-row decode path (the GEMV kernel) as well as the batched prefill path
    assert_int8_close(logits(acc, ids[:1, :1]), logits(ref, ids[:1, :1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_generate_and_left_padded_batch(family):
    model = hetero_llm.accelerate(tiny_model(family))
    long, short = prompt(10, 6), prompt(6, 7)
    single = greedy(model, long)
    assert single.shape == (1, long.shape[1] + NEW_TOKENS)
    assert torch.equal(single[:, : long.shape[1]], long)

    ids, mask = left_padded_batch(long, short)
    batch = greedy(model, ids, attention_mask=mask)
    assert batch.shape == (2, ids.shape[1] + NEW_TOKENS)
    # The row without padding generates what the prompt alone generates, up to
    # near-ties: a batch of 2 prefills 20 rows (the GEMM path), the prompt alone
    # 10 (the GEMV path), and the two round differently. Compared as logits.
    assert torch.equal(batch[0, : long.shape[1]], single[0, : long.shape[1]])
    with torch.inference_mode():
        assert_int8_close(model(ids[:1]).logits[0, -1].float(), model(long).logits[0, -1].float())
    # The mask is honoured: the padded row's next-token logits match its unpadded
    # prompt's. (Compared as logits: greedy chains of a random INT8 model may part at
    # near-ties, because a batch of 2 rounds bf16 activations like a batch of 1 but
    # the GEMV kernel's blocking can differ.)
    with torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them
        padded = model(ids, attention_mask=mask, position_ids=positions).logits[1, -1].float()
        alone = model(short).logits[0, -1].float()
    assert_int8_close(padded, alone)


@pytest.mark.parametrize("quantize", ["none", "auto"])
def test_llama_static_cache_generation(quantize):
    ref = tiny_model("llama")
    acc = accelerated_copy(ref, quantize=quantize)
    ids = prompt(9, 8)
    static = greedy(acc, ids, cache_implementation="static")
    assert static.shape == (1, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(static, greedy(acc, ids))
    if quantize == "none":
        assert torch.equal(static, greedy(ref, ids, cache_implementation="static"))


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "opt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(family, dtype):
    ref = tiny_model(family).to(dtype)
    ids = torch.cat([prompt(12, 1), prompt(12, 2)])
    want = logits(ref, ids)
    fused = accelerated_copy(ref, quantize="none")
    torch.testing.assert_close(logits(fused, ids), want, **FUSED_TOL[dtype])
    int8 = accelerated_copy(ref)
    assert all(m.scale.dtype == torch.float32 for m in int8.modules() if isinstance(m, Int8Linear))
    assert_int8_close(logits(int8, ids), want)
    assert greedy(int8, ids[:1]).shape == (1, 12 + NEW_TOKENS)


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3", "opt"])
def test_cast_to_bf16_after_accelerating(family):
    ref = tiny_model(family)
    model = accelerated_copy(ref).to(torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    ids = torch.cat([prompt(12, 1), prompt(12, 2)])
    assert_int8_close(logits(model, ids), logits(ref, ids))
    assert greedy(model, ids[:1]).shape == (1, 12 + NEW_TOKENS)


# -- which modules were swapped ---------------------------------------------------------------

def _assert_types(model: nn.Module, expected: dict[str, type]) -> None:
    got = {name: type(model.get_submodule(name)) for name in expected}
    assert got == expected


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_llama_like_swaps(family):
    model = hetero_llm.accelerate(tiny_model(family))
    for i in range(2):
        p = f"model.layers.{i}"
        _assert_types(model, {f"{p}.self_attn": RotaryAttention, f"{p}.self_attn.qkv": Int8Linear,
                              f"{p}.self_attn.o_proj": Int8Linear, f"{p}.mlp": GatedMLP,
                              f"{p}.mlp.gate_up": Int8Linear, f"{p}.mlp.down_proj": Int8Linear,
                              f"{p}.input_layernorm": RMSNorm, f"{p}.post_attention_layernorm": RMSNorm})
        attn = model.get_submodule(f"{p}.self_attn")
        assert (attn.num_heads, attn.num_kv_heads) == (4, 2)
        assert attn.qkv.out_features == (4 + 2 + 2) * attn.head_dim
    _assert_types(model, {"model.norm": RMSNorm, "model.embed_tokens": Int8Embedding})
    tied = model.config.get_text_config().tie_word_embeddings
    assert isinstance(model.lm_head, TiedInt8Linear if tied else Int8Linear)
    if tied:  # one INT8 table serves lookups and logits
        assert model.lm_head.qweight is model.model.embed_tokens.qweight
    assert model.model.norm.offset == (1.0 if family == "gemma" else 0.0)
    assert not any(type(m) is nn.Linear for m in model.modules())
    swapped = {name for name, _, _ in model.hetero_replaced}
    assert {"model.layers.0.self_attn", "model.layers.1.mlp", "lm_head", "model.norm"} <= swapped


def test_phi3_swaps():
    model = hetero_llm.accelerate(tiny_model("phi3"))
    for i in range(2):
        p = f"model.layers.{i}"
        _assert_types(model, {f"{p}.self_attn.qkv_proj": Int8Linear, f"{p}.self_attn.o_proj": Int8Linear,
                              f"{p}.mlp.gate_up_proj": Int8Linear, f"{p}.mlp.down_proj": Int8Linear,
                              f"{p}.input_layernorm": RMSNorm, f"{p}.post_attention_layernorm": RMSNorm})
    _assert_types(model, {"model.norm": RMSNorm, "lm_head": Int8Linear})


@pytest.mark.parametrize("embeddings", [True, False])
def test_gpt2_conv1d_becomes_int8_and_tied_embedding_policy(embeddings):
    ref = tiny_model("gpt2")
    model = accelerated_copy(ref, quantize=QuantConfig(scheme="int8", embeddings=embeddings))
    for i in range(2):
        p = f"transformer.h.{i}"
        _assert_types(model, {f"{p}.attn.c_attn": Int8Linear, f"{p}.attn.c_proj": Int8Linear,
                              f"{p}.mlp.c_fc": Int8Linear, f"{p}.mlp.c_proj": Int8Linear,
                              f"{p}.ln_1": nn.LayerNorm, f"{p}.ln_2": nn.LayerNorm})
        c_attn = model.get_submodule(f"{p}.attn.c_attn")
        assert (c_attn.in_features, c_attn.out_features) == (64, 192)  # Conv1D's (in, out) read right
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    wte = model.transformer.wte
    if embeddings:  # the tied lm_head reads the embedding's INT8 rows: one copy
        assert isinstance(wte, Int8Embedding) and isinstance(model.lm_head, TiedInt8Linear)
        assert model.lm_head.qweight is wte.qweight
        assert isinstance(model.transformer.wpe, nn.Embedding)  # position table: kept
        assert "lm_head" not in dict(model.named_buffers(remove_duplicate=False)).keys()
    else:  # the embedding keeps its float table, the lm_head gets its own INT8 copy
        assert isinstance(model.lm_head, Int8Linear)
        assert isinstance(wte, nn.Embedding) and wte.weight.dtype == torch.float32
        torch.testing.assert_close(wte.weight, ref.transformer.wte.weight, atol=0, rtol=0)
    with torch.inference_mode():
        ids = prompt(8, 3)
        assert_int8_close(model(ids).logits.float(), ref(ids).logits.float())


@pytest.mark.parametrize("quantize", ["auto", "none"])
def test_opt_qkv_become_slices_of_one_fused_projection(quantize):
    model = hetero_llm.accelerate(tiny_model("opt"), quantize=quantize)
    inner = Int8Linear if quantize == "auto" else nn.Linear
    for i in range(2):
        attn = model.get_submodule(f"model.decoder.layers.{i}.self_attn")
        slices = [attn.q_proj, attn.k_proj, attn.v_proj]
        assert all(isinstance(s, ProjectionSlice) for s in slices)
        assert [s.index for s in slices] == [0, 1, 2]
        assert all(s.fused is attn.hetero_qkv for s in slices)
        assert isinstance(attn.hetero_qkv, FusedProjection) and isinstance(attn.hetero_qkv.linear, inner)
        assert isinstance(attn.out_proj, inner)
    # the fused weight is registered once: state_dict does not hold it three times
    keys = [k for k in model.state_dict() if "layers.0.self_attn" in k]
    assert not any(k.startswith("model.decoder.layers.0.self_attn.q_proj") for k in keys)


def test_fusions_disabled_keep_separate_projections():
    from hetero_llm import KernelConfig
    ref = tiny_model("llama")
    model = accelerated_copy(ref, kernels=KernelConfig(fuse_projections=False, fuse_norms=False))
    layer = model.model.layers[0]
    assert type(layer.self_attn).__name__ == "LlamaAttention"
    assert type(layer.mlp).__name__ == "LlamaMLP"
    assert isinstance(layer.self_attn.q_proj, Int8Linear)
    assert type(layer.input_layernorm).__name__ == "LlamaRMSNorm"
    ids = prompt(12, 1)
    assert_int8_close(logits(model, ids), logits(ref, ids))


# -- architectures without a role table ------------------------------------------------------

def tiny_unknown() -> nn.Module:
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_unknown_architecture_strict_refuses_without_changes():
    model = tiny_unknown()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(UnsupportedArchitectureError, match="strict=False") as info:
        hetero_llm.accelerate(model)
    assert "gpt_neox" in str(info.value) and "llama" in str(info.value)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not hasattr(model, "hetero_plan")
    with pytest.raises(UnsupportedArchitectureError):
        hetero_llm.plan(model)


def test_unknown_architecture_non_strict_quantizes_linears_only():
    ref = tiny_unknown()
    model = accelerated_copy(ref, strict=False)
    p = model.hetero_plan
    assert p.family is None and any("gpt_neox" in n for n in p.notes)
    linear_entries = [e for e in p.entries if e.role == "linear"]
    assert len(linear_entries) == 2 * 4 + 1  # 4 linears per block + the output projection
    assert all(e.action == "quantize" for e in linear_entries)
    others = [e for e in p.entries if e.role != "linear"]
    assert others and all(e.action == "skip" and e.reason for e in others)
    for e in linear_entries:
        assert isinstance(model.get_submodule(e.name), Int8Linear)
    for e in others:  # left untouched
        assert type(model.get_submodule(e.name)) is type(ref.get_submodule(e.name))
    assert not any(type(m) is nn.Linear for m in model.modules())
    ids = torch.cat([prompt(12, 1), prompt(12, 2)])
    assert_int8_close(logits(model, ids), logits(ref, ids))
    out = greedy(model, ids[:1])
    assert out.shape == (1, 12 + NEW_TOKENS)
