"""The architecture table names every child a fused module replaces; a module with a child it
does not name is left to transformers (planned) or refused (applied), never silently dropped."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hetero_llm
from hetero_llm.errors import UnsupportedArchitectureError
from hetero_llm.fused.apply import apply_gated_mlp, apply_rotary_attention
from hetero_llm.integrations.transformers import map_roles, spec_by_family
from hetero_llm.plan import Fusion

from tiny_models import assert_same_tokens, tiny_model


def test_the_table_names_the_children_of_a_layer_its_attention_and_its_mlp():
    llama, qwen3 = spec_by_family("llama"), spec_by_family("qwen3")
    assert llama.children() == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    assert llama.children("attention") == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert llama.children("mlp") == {"gate_proj", "up_proj", "down_proj", "act_fn"}
    assert qwen3.children("attention") == {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}


def test_the_children_match_the_installed_transformers_modules():
    for family in ("llama", "qwen3"):
        spec, model = spec_by_family(family), tiny_model(family)
        layer = model.get_submodule(f"{spec.layers}.0")
        assert set(dict(layer.named_children())) == spec.children()
        for role in ("attention", "mlp"):
            module = layer.get_submodule(spec.roles[role])
            assert set(dict(module.named_children())) == spec.children(role), (family, role)


class _Extra(nn.Module):
    """A child a new transformers release might add (it does nothing here, so outputs stay equal)."""

    def forward(self, x):
        return x


def _with_unknown_attention_child(family: str = "llama") -> nn.Module:
    model = tiny_model(family)
    for layer in model.model.layers:
        layer.self_attn.extra = _Extra()
    return model


def test_an_unknown_attention_child_is_left_to_transformers_and_noted(monkeypatch, tmp_path):
    # As a transformers release adding a part to the class would: every instance has it, the
    # self-check's tiny model too (its verdicts, keyed by release and config, kept apart here).
    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr("hetero_llm.selfcheck._VERDICTS", {})
    from transformers.models.llama.modeling_llama import LlamaAttention
    init = LlamaAttention.__init__

    def with_extra(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.extra = _Extra()
    monkeypatch.setattr(LlamaAttention, "__init__", with_extra)
    model = tiny_model("llama")
    roles = map_roles(model, spec_by_family("llama"))
    assert roles.unknown_children == {f"model.layers.{i}.self_attn": ["extra"] for i in range(2)}
    kinds = {kind for _, _, kind in roles.fusion_groups}
    assert "rotary_attention" not in kinds and {"qkv", "gated_mlp"} <= kinds
    plan = hetero_llm.plan(model, hardware="cpu-2core", quantize="none")
    assert any("does not describe (first: model.layers.0.self_attn: extra)" in n for n in plan.notes)
    original = copy.deepcopy(model)
    accelerated = hetero_llm.accelerate(model, hardware="cpu-2core", quantize="none")
    assert isinstance(accelerated.model.layers[0].self_attn.extra, _Extra)  # kept
    assert_same_tokens(original, accelerated)


def test_a_fused_swap_refuses_a_module_with_an_unknown_child():
    spec = spec_by_family("llama")
    model = _with_unknown_attention_child()
    prefix = "model.layers.0"
    attention = Fusion(f"{prefix}.self_attn", tuple(f"{prefix}.self_attn.{p}_proj" for p in "qkv"), "rotary_attention")
    with pytest.raises(UnsupportedArchitectureError, match="'extra'"):
        apply_rotary_attention(model, attention, spec)
    model.model.layers[0].mlp.extra = _Extra()
    mlp = Fusion(f"{prefix}.mlp", (f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"), "gated_mlp")
    with pytest.raises(UnsupportedArchitectureError, match="'extra'"):
        apply_gated_mlp(model, mlp, spec)


def test_qwen3_q_and_k_norms_run_inside_the_fused_attention():
    model = tiny_model("qwen3")
    original = copy.deepcopy(model)
    accelerated = hetero_llm.accelerate(model, quantize="none")
    attn = accelerated.model.layers[0].self_attn
    assert type(attn).__name__ == "RotaryAttention" and attn.q_norm is not None and attn.k_norm is not None
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(ids).logits, accelerated(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert_same_tokens(original, accelerated)
