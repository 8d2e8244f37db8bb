"""The parts a plan swaps in, and plans with parts taken out (pure functions on Plan)."""
from __future__ import annotations

import pytest

import hetero_llm
from hetero_llm.planner.swaps import PARTS, plan_parts, with_only_parts, with_requirements_removed, without_parts
from hetero_llm.integrations.transformers import spec_for
from tiny_models import tiny_model


def _gpu_plan(family="llama", quantize="none"):
    return hetero_llm.plan(tiny_model(family), hardware="h100-80gb", quantize=quantize)


def test_parts_of_cpu_and_gpu_plans():
    model = tiny_model("llama")
    assert plan_parts(hetero_llm.plan(model, hardware="cpu-2core", quantize="none")) == ("norms", "attention", "mlp")
    assert plan_parts(_gpu_plan()) == ("norms", "attention", "mlp", "decoder_layer", "attention_interface",
                                       "decode_step")
    assert plan_parts(hetero_llm.plan(tiny_model("opt"), hardware="cpu-2core")) == ("projections",)
    assert plan_parts(hetero_llm.plan(tiny_model("gpt2"), hardware="cpu-2core")) == ()


def test_requirements_follow_what_they_need():
    assert with_requirements_removed({"attention"}) == {"attention", "decoder_layer", "decode_step"}
    assert with_requirements_removed({"norms"}) == {"norms", "decoder_layer"}
    assert with_requirements_removed({"decode_step"}) == {"decode_step"}


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_without_attention_leaves_transformers_attention_and_what_needs_it(quantize):
    plan = _gpu_plan(quantize=quantize)
    out = without_parts(plan, {"attention"}, "self-check failed")
    assert plan_parts(out) == ("norms", "mlp", "attention_interface")
    assert out.model_settings["decode"] == "transformers"
    attn = out.entry("model.layers.0.self_attn")
    assert (attn.action, attn.kernel, attn.reason) == ("keep", "sdpa", "self-check failed")
    assert "+fused:" not in out.entry("model.layers.0.self_attn.q_proj").kernel
    assert not any(e.kernel in ("triton-linear_add", "triton-add_rms_norm") for e in out.entries)
    assert "self-check failed (left to transformers: attention, decoder_layer, decode_step)" in out.notes
    assert without_parts(out, {"attention"}, "again") == out  # nothing left to take out


def test_without_norms_and_interface():
    out = without_parts(_gpu_plan(), {"norms", "attention_interface"}, "why")
    assert plan_parts(out) == ("attention", "mlp", "decode_step")
    assert "attn_implementation" not in out.model_settings
    norm = out.entry("model.layers.0.input_layernorm")
    assert (norm.action, norm.kernel) == ("keep", "torch")


def test_a_plan_without_parts_applies_on_the_model():
    model = tiny_model("llama")
    plan = without_parts(hetero_llm.plan(model, quantize="int8"), set(PARTS), "all out")
    out = hetero_llm.accelerate(model, plan=plan)
    assert plan_parts(out.hetero_plan) == ()
    assert not any(type(m).__name__ in ("RotaryAttention", "GatedMLP", "RMSNorm") for m in out.modules())


@pytest.mark.parametrize("parts", [("norms",), ("attention", "decode_step"), ("norms", "attention", "mlp",
                                                                            "decoder_layer", "attention_interface")])
def test_with_only_parts_for_the_tiny_model(parts):
    model = tiny_model("llama")
    plan = hetero_llm.plan(model, hardware="cpu-2core", quantize="none", kernels="torch", decode="transformers")
    assert plan_parts(with_only_parts(plan, parts, model, spec_for(model))) == parts
