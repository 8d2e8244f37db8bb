"""W8A8 and per-group INT8 end to end on tiny models: accelerate(), plans, errors, predicted memory."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm import QuantConfig
from hetero_llm.errors import InvalidOptionError
from hetero_llm.quant import Int8Linear, sqnr_db
from hetero_llm.quant.calibrate import activation_absmax, smoothing_factors
from hetero_llm.quant.embedding import Int8Embedding, TiedInt8Linear
from hetero_llm.quant.w8a8 import W8A8Linear
from tiny_shapes import TINY_SHAPES

# Tolerances, in one place (logits of the accelerated model against the original, fp32).
# Measured with 4 calibration samples: W8A8 cosine >= 0.9994, max |diff| / max |logit| <= 0.039
# (llama 0.038, qwen2 0.039, gemma 0.011, gpt2 0.026, opt 0.019); weight-only INT8 as in
# tests/integrations.
MIN_COSINE = {"w8a8": 0.998, "int8": 0.99}
MAX_REL_ERR = {"w8a8": 0.06, "int8": 0.05}
# A llama with activation outliers (norm weights x50 on a few channels): logits SQNR measured
# 13.4 dB for plain W8A8, 30.7 dB smoothed (alpha 0.5), 30.6 dB with 4 fp outlier channels.
OUTLIER_GAIN_DB = 10.0

VOCAB = 256
BASE = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
CONFIGS = {**TINY_SHAPES, "opt": dict(TINY_SHAPES["opt"], init_std=0.1)}
FAMILIES = [f for f in ("llama", "qwen2", "gemma", "gpt2", "opt") if f in CONFIGS]
W8A8 = QuantConfig(scheme="w8a8")
NEW_TOKENS = 6


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    cfg = AutoConfig.for_model(model_type, **{**BASE, **CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompt(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


CALIBRATION = [prompt(16, 100 + i) for i in range(4)]
IDS = torch.cat([prompt(12, 1), prompt(12, 2)])


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids).logits.float()


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, kind: str) -> None:
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert cos > MIN_COSINE[kind] and rel < MAX_REL_ERR[kind], (cos, rel)


def base_kernel(e) -> str:
    return e.kernel.split("+", 1)[0]


def w8a8_copy(ref: nn.Module, quantize: QuantConfig = W8A8, data=CALIBRATION, **options) -> nn.Module:
    return hetero_llm.accelerate(copy.deepcopy(ref), quantize=quantize, calibration_data=data, **options)


def linear_entries(plan):
    return [e for e in plan.by_action("quantize") if e.role != "embed"]


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_logits_generate_and_plan(family):
    ref = tiny_model(family)
    model = w8a8_copy(ref)
    assert_close_logits(logits(model), logits(ref), "w8a8")
    assert_close_logits(logits(model, IDS[:1, :1]), logits(ref, IDS[:1, :1]), "w8a8")  # one-row decode
    out = model.generate(IDS[:1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape == (1, 12 + NEW_TOKENS) and torch.equal(out[:, :12], IDS[:1])

    plan = model.hetero_plan
    entries = linear_entries(plan)
    body = [e for e in entries if e.role != "lm_head"]
    assert body and all(e.quant == "w8a8" and base_kernel(e) == "cpu-intmm" for e in body)
    head = plan.entry("lm_head")
    assert head.quant == "int8" and base_kernel(head) in ("cpu-vnni", "cpu-int8pack", "torch-dequant")
    assert "tied to the embedding" in head.reason or "weight-only for the output projection" in head.reason
    assert isinstance(model.lm_head, (Int8Linear, TiedInt8Linear))  # logits stay weight-only
    w8a8 = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert w8a8 and all(m.backend == "cpu-intmm" and m.smooth is not None and m.outlier_index is None
                        for m in w8a8)
    assert not any(type(m) is nn.Linear or type(m).__name__ == "Conv1D" for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fused_projections_share_one_smoothing_vector(family):
    ref = tiny_model(family)
    model = w8a8_copy(ref)
    plan = model.hetero_plan
    stats = activation_absmax(ref, [m for f in plan.fusions for m in f.members], CALIBRATION, progress=False)
    assert plan.fusions
    for fusion in plan.fusions:
        fused = fused_linear(model, fusion)
        assert isinstance(fused, W8A8Linear)
        members = [ref.get_submodule(m) for m in fusion.members]
        assert fused.out_features == sum(m.out_features for m in members)
        # one input, one vector: from the members' activation maxima and their joint weight maxima
        act = stats[fusion.members[0]]
        w_max = torch.stack([m.weight.detach().abs().amax(0) for m in members]).amax(0)
        joint = 1.0 / smoothing_factors(act, w_max, W8A8.smooth_alpha)
        torch.testing.assert_close(fused.smooth, joint, rtol=1e-6, atol=0)
        own = 1.0 / smoothing_factors(act, members[0].weight.detach().abs().amax(0), W8A8.smooth_alpha)
        assert not torch.allclose(fused.smooth, own)  # the test can tell joint from per-member


def fused_linear(model: nn.Module, fusion) -> nn.Module:
    """The one linear the kernels pass built for a fused group."""
    if fusion.kind == "rotary_attention":
        return model.get_submodule(fusion.name).qkv
    if fusion.kind == "gated_mlp":
        return model.get_submodule(fusion.name).gate_up
    return model.get_submodule(fusion.members[0]).fused.linear  # a ProjectionSlice's FusedProjection


def test_gpt2_conv1d_becomes_w8a8():
    ref = tiny_model("gpt2")
    model = w8a8_copy(ref)
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, W8A8Linear) and (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert isinstance(model.transformer.wte, Int8Embedding) and isinstance(model.lm_head, TiedInt8Linear)


def test_outlier_channels_end_to_end():
    ref = tiny_model("llama")
    model = w8a8_copy(ref, QuantConfig(scheme="w8a8", outlier_channels=4))
    qkv = model.model.layers[0].self_attn.qkv
    assert isinstance(qkv, W8A8Linear) and qkv.outlier_index.numel() == 4
    idx = qkv.outlier_index
    assert torch.equal(idx, idx.sort().values) and torch.all(qkv.qweight[:, idx] == 0)
    assert qkv.outlier_weight.shape == (qkv.out_features, 4)
    assert "fp_outlier_channels=4" in repr(qkv)
    assert_close_logits(logits(model), logits(ref), "w8a8")


def outlier_llama() -> nn.Module:
    """A llama whose norms blow up a few channels, as real LLM activations do."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[5, 40]] *= 50
            layer.post_attention_layernorm.weight[9] *= 50
    return model


def test_smoothing_and_fp_outliers_rescue_activation_outliers():
    ref = outlier_llama()
    want = logits(ref)
    plain = sqnr_db(want, logits(w8a8_copy(ref, QuantConfig(scheme="w8a8", smooth_alpha=0), data=None)))
    smoothed = sqnr_db(want, logits(w8a8_copy(ref)))
    kept = sqnr_db(want, logits(w8a8_copy(ref, QuantConfig(scheme="w8a8", smooth_alpha=0, outlier_channels=4))))
    assert smoothed > plain + OUTLIER_GAIN_DB, (plain, smoothed)
    assert kept > plain + OUTLIER_GAIN_DB, (plain, kept)


def test_no_calibration_without_smoothing_or_outliers():
    ref = tiny_model("qwen2")
    quant = QuantConfig(scheme="w8a8", smooth_alpha=0, outlier_channels=0)
    assert not quant.needs_calibration
    model = w8a8_copy(ref, quant, data=None)
    w8a8 = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert w8a8 and all(m.smooth is None and m.outlier_index is None for m in w8a8)
    assert_close_logits(logits(model), logits(ref), "w8a8")
    with pytest.raises(InvalidOptionError, match="calibration_data"):
        w8a8_copy(ref, quant, data=CALIBRATION)


def test_w8a8_half_cast_after_accelerating():
    ref = tiny_model("llama")
    model = w8a8_copy(ref).half()
    w8a8 = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert all(m.scale.dtype == torch.float32 and m.smooth.dtype == torch.float32 for m in w8a8)
    with torch.no_grad():
        out = model(IDS).logits
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_close_logits(out.float(), logits(ref), "w8a8")


def test_kernels_torch_uses_the_reference_w8a8_path():
    ref = tiny_model("llama")
    model = w8a8_copy(ref, kernels="torch")
    body = [e for e in linear_entries(model.hetero_plan) if e.role != "lm_head"]
    assert all(base_kernel(e) == "torch-w8a8" and "reference W8A8" in e.reason for e in body)
    assert all(m.backend == "torch-w8a8" for m in model.modules() if isinstance(m, W8A8Linear))
    fast = w8a8_copy(ref)
    pairs = [(a, b) for a, b in zip(model.modules(), fast.modules()) if isinstance(a, W8A8Linear)]
    assert pairs and all(torch.equal(a.qweight, b.qweight) and torch.equal(a.smooth, b.smooth)
                         for a, b in pairs)  # same integers, only the matmul differs
    assert_close_logits(logits(model), logits(ref), "w8a8")


# -- errors ----------------------------------------------------------------------------------------

def test_w8a8_without_calibration_data_is_refused_before_any_change():
    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match="calibration_data") as info:
        hetero_llm.accelerate(model, quantize="w8a8")
    assert "smooth_alpha=0" in str(info.value)  # the way out without data
    assert not hasattr(model, "hetero_plan")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(isinstance(m, (W8A8Linear, Int8Linear, Int8Embedding)) for m in model.modules())


@pytest.mark.parametrize("quantize", ["int8", "int8-asym", "none", QuantConfig(granularity="group", group_size=64)])
def test_calibration_data_without_w8a8_is_refused(quantize):
    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match="calibration_data"):
        hetero_llm.accelerate(model, quantize=quantize, calibration_data=CALIBRATION)
    assert not hasattr(model, "hetero_plan")


def test_bad_calibration_data_is_refused_before_any_change():
    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match="(?i)tokeni[sz]e"):
        hetero_llm.accelerate(model, quantize="w8a8", calibration_data=["some raw text"])
    assert not hasattr(model, "hetero_plan")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


# -- the planner: granularity, embeddings, predicted memory -----------------------------------------------

def test_group_granularity_plan_and_model():
    ref = tiny_model("llama")
    quant = QuantConfig(scheme="int8", granularity="group", group_size=64)
    plan = hetero_llm.plan(ref, hardware="cpu-2core", quantize=quant)
    entries = linear_entries(plan)
    assert entries and all(e.quant == "int8:g64" and base_kernel(e) == "torch-dequant" for e in entries)
    assert all("per-group scales" in e.reason for e in entries)
    model = hetero_llm.accelerate(copy.deepcopy(ref), plan=plan)
    layer = model.model.layers[0]
    for m in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj, model.lm_head):
        assert isinstance(m, Int8Linear) and m.group_size == 64 and m.backend == "torch-dequant"
        assert m.scale.shape == (m.out_features, m.in_features // 64)
    assert_close_logits(logits(model), logits(ref), "int8")


@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
def test_group_size_not_dividing_in_features_falls_back_per_channel(scheme):
    ref = tiny_model("llama")  # hidden 64, intermediate 128
    quant = QuantConfig(scheme=scheme, granularity="group", group_size=128)
    plan = hetero_llm.plan(ref, hardware="cpu-2core", quantize=quant)
    q = plan.entry("model.layers.0.self_attn.q_proj")
    assert q.quant == scheme and "not a multiple of group_size=128: per channel" in q.reason
    assert "in_features=64" in q.reason
    down = plan.entry("model.layers.0.mlp.down_proj")
    assert down.quant == f"{scheme}:g128" and base_kernel(down) == "torch-dequant"
    model = hetero_llm.accelerate(copy.deepcopy(ref), plan=plan)
    assert model.model.layers[0].self_attn.qkv.group_size is None
    assert model.model.layers[0].mlp.down_proj.group_size == 128
    assert_close_logits(logits(model), logits(ref), "int8")


def test_embeddings_false_keeps_the_embedding():
    ref = tiny_model("gemma")
    quant = QuantConfig(scheme="w8a8", embeddings=False)
    model = w8a8_copy(ref, quant)
    plan = model.hetero_plan
    e = plan.entry("model.embed_tokens")
    assert e.action == "keep" and "embeddings=False" in e.reason
    assert type(model.model.embed_tokens) is type(ref.model.embed_tokens)
    torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight, rtol=0, atol=0)
    head = plan.entry("lm_head")
    assert head.quant == "int8" and "keeps its floating-point copy" in head.reason
    assert type(model.lm_head) is Int8Linear  # its own INT8 copy: the table is no longer shared
    assert_close_logits(logits(model), logits(ref), "w8a8")


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model saves (a tied table once)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())


def unsaved_buffer_bytes(model: nn.Module) -> int:
    """Buffers kept but not saved (rotary inv_freq): the planner counts those of non-embedding modules."""
    saved = {t.data_ptr() for t in model.state_dict().values()}
    return sum(b.numel() * b.element_size() for m in model.modules() if not isinstance(m, nn.Embedding)
               for b in m.buffers(recurse=False) if b is not None and b.data_ptr() not in saved)


@pytest.mark.parametrize("family, overrides", [("gemma", {}), ("llama", dict(tie_word_embeddings=True))])
@pytest.mark.parametrize("quantize", [QuantConfig(), QuantConfig(lm_head=False), QuantConfig(embeddings=False)],
                         ids=["default", "lm_head-fp", "embeddings-fp"])
def test_predicted_weight_memory_on_a_tied_model(family, overrides, quantize):
    ref = tiny_model(family, **overrides)
    assert ref.lm_head.weight is ref.get_input_embeddings().weight
    plan = hetero_llm.plan(ref, hardware="cpu-2core", quantize=quantize)
    extra = unsaved_buffer_bytes(ref)
    assert plan.prediction.weight_mb_before * 2**20 == stored_bytes(ref) + extra  # the tied table once
    model = hetero_llm.accelerate(copy.deepcopy(ref), plan=plan)
    assert plan.prediction.weight_mb_after * 2**20 == stored_bytes(model) + extra


def test_tied_prediction_counts_the_shared_int8_table_once():
    tied = hetero_llm.plan(tiny_model("llama", tie_word_embeddings=True), hardware="cpu-2core").prediction
    untied = hetero_llm.plan(tiny_model("llama"), hardware="cpu-2core").prediction
    vocab, hidden = VOCAB, CONFIGS["llama"]["hidden_size"]
    assert (untied.weight_mb_before - tied.weight_mb_before) * 2**20 == 4 * vocab * hidden
    # the untied lm_head adds its own INT8 rows and fp32 scales; the tied one adds nothing
    assert (untied.weight_mb_after - tied.weight_mb_after) * 2**20 == vocab * hidden + 4 * vocab
