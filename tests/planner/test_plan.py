"""Plan: pure data, exact JSON round trip, display, hand edits."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm import Plan, PlanEntry, PlanMismatchError
from hetero_llm.planner import Fusion, Prediction
from hetero_llm.plan import PLAN_VERSION

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SHAPES = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=64),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def meta_model(model_type: str = "llama", **overrides):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **SHAPES[model_type], **overrides})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def cpu_plan() -> Plan:
    return hetero_llm.plan(meta_model(), hardware="cpu-2core")


PLANS = {
    "llama-cpu": lambda: hetero_llm.plan(meta_model(), hardware="cpu-2core"),
    "this-machine": lambda: hetero_llm.plan(meta_model()),  # inspected hardware (tuples, None fields)
    "llama-h100": lambda: hetero_llm.plan(meta_model(), hardware="h100-80gb"),
    "llama-none": lambda: hetero_llm.plan(meta_model(), hardware="cpu-2core", quantize="none"),
    "llama-asym-odd": lambda: hetero_llm.plan(meta_model(hidden_size=40), hardware="cpu-2core",
                                              quantize="int8-asym"),
    "gpt2": lambda: hetero_llm.plan(meta_model("gpt2"), hardware="cpu-2core"),
    "opt": lambda: hetero_llm.plan(meta_model("opt"), hardware="cpu-8core-32gb"),
    "unknown": lambda: hetero_llm.plan(meta_model("gpt_neox"), hardware="cpu-2core", strict=False),
}


@pytest.mark.parametrize("name", PLANS)
def test_json_round_trip_is_exact(name):
    p = PLANS[name]()
    text = p.to_json()
    back = Plan.from_json(text)
    assert back == p
    assert back.to_json() == text
    assert Plan.from_json(p.to_json(indent=None)) == p
    assert isinstance(back.entries, tuple) and all(isinstance(e, PlanEntry) for e in back.entries)
    assert all(isinstance(f, Fusion) and isinstance(f.members, tuple) for f in back.fusions)


def test_round_trip_keeps_float_precision(cpu_plan):
    e = cpu_plan.entries[1]
    odd = cpu_plan.with_entry(e.name, decode_us_before=0.1 + 0.2, decode_us_after=1 / 3)
    back = Plan.from_json(odd.to_json())
    assert back.entry(e.name).decode_us_before == 0.1 + 0.2
    assert back.entry(e.name).decode_us_after == 1 / 3


def test_plan_json_is_plain_data(cpu_plan):
    d = json.loads(cpu_plan.to_json())
    assert d["version"] == PLAN_VERSION
    assert d["model_type"] == "llama" and d["family"] == "llama" and d["device"] == "cpu"
    assert d["hardware"]["name"] == "cpu-2core"
    assert d["options"]["quantize"]["scheme"] == "auto"
    assert len(d["entries"]) == len(cpu_plan.entries)


@pytest.mark.parametrize("version", [None, 0, PLAN_VERSION + 1, "1"])
def test_wrong_version_is_refused(cpu_plan, version):
    d = json.loads(cpu_plan.to_json())
    if version is None:
        del d["version"]
    else:
        d["version"] = version
    with pytest.raises(PlanMismatchError, match=r"hetero_llm\.plan\(\)"):
        Plan.from_json(json.dumps(d))


@pytest.mark.parametrize("corrupt", ["not json", "{", ""])
def test_invalid_json_is_refused(corrupt):
    with pytest.raises(PlanMismatchError, match="not valid JSON"):
        Plan.from_json(corrupt)


@pytest.mark.parametrize("corrupt", ["[]", "null", "42"])
def test_json_that_is_not_an_object_is_refused(corrupt):
    with pytest.raises(PlanMismatchError):
        Plan.from_json(corrupt)


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("entries"),
    lambda d: d.pop("fusions"),
    lambda d: d["entries"][0].pop("name"),
    lambda d: d["entries"][0].update(colour="red"),
])
def test_incomplete_plan_is_refused(cpu_plan, mutate):
    d = json.loads(cpu_plan.to_json())
    mutate(d)
    with pytest.raises(PlanMismatchError, match="not a valid hetero_llm plan"):
        Plan.from_json(json.dumps(d))


def test_table_groups_numbered_layers(cpu_plan):
    text = str(cpu_plan)
    assert text == cpu_plan.table()
    assert "model.layers.{0-1}.self_attn " in text
    assert "model.layers.{0-1}.mlp.down_proj" in text
    assert "model.layers.0." not in text and "model.layers.1." not in text
    assert "×2" in text
    header = text.splitlines()[0]
    assert "llama" in header and "cpu-2core" in header
    assert "predicted decode" in text and "quantize" in text


def test_full_table_lists_every_module(cpu_plan):
    text = cpu_plan.table(full=True)
    for e in cpu_plan.entries:
        assert e.name in text
    assert "{0-1}" not in text
    rows = cpu_plan.rows(full=True)
    assert len(rows) == len(cpu_plan.entries)
    assert len(cpu_plan.rows()) < len(rows)


def test_grouping_keeps_different_decisions_apart(cpu_plan):
    edited = cpu_plan.with_entry("model.layers.1.self_attn.o_proj", action="keep", kernel="torch", quant=None,
                                 decode_us_after=cpu_plan.entry("model.layers.1.self_attn.o_proj").decode_us_before)
    text = edited.table()
    assert "model.layers.{0}.self_attn.o_proj" in text and "model.layers.{1}.self_attn.o_proj" in text
    assert "model.layers.{0-1}.self_attn.o_proj" not in text


def test_grouping_ranges_with_gaps():
    p = hetero_llm.plan(meta_model(num_hidden_layers=6), hardware="cpu-2core")
    name = "model.layers.3.mlp.down_proj"
    edited = p.with_entry(name, reason="pinned by hand")
    text = edited.table()
    assert "model.layers.{0-2,4-5}.mlp.down_proj" in text
    assert "model.layers.{3}.mlp.down_proj" in text


def test_html(cpu_plan):
    html = cpu_plan._repr_html_()
    assert "<table>" in html and "</table>" in html
    assert html.count("<tr>") == len(cpu_plan.rows()) + 1  # header + rows
    assert "model.layers.{0-1}.self_attn" in html


def test_html_escapes_text(cpu_plan):
    e = cpu_plan.entries[0]
    html = cpu_plan.with_entry(e.name, reason="<script>alert(1)</script> & more")._repr_html_()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html and "&amp; more" in html


def test_prediction(cpu_plan):
    pred = cpu_plan.prediction
    assert isinstance(pred, Prediction)
    assert pred.decode_speedup > 1
    assert pred.decode_speedup == pytest.approx(pred.decode_ms_before / pred.decode_ms_after)
    assert pred.weight_mb_after < pred.weight_mb_before / 2  # int8 vs fp32
    assert Prediction(1.0, 0.0, 1.0, 1.0).decode_speedup == 1.0


def test_prediction_without_changes_is_neutral():
    p = hetero_llm.plan(meta_model(), hardware="cpu-2core", quantize="none",
                        kernels=hetero_llm.KernelConfig(fuse_projections=False, fuse_norms=False))
    assert not p.by_action("quantize") and not p.by_action("swap")
    assert p.prediction.decode_speedup == pytest.approx(1.0)
    assert p.prediction.weight_mb_after == pytest.approx(p.prediction.weight_mb_before)


def test_with_entry_edits_one_entry_only(cpu_plan):
    name = "model.layers.0.mlp.down_proj"
    edited = cpu_plan.with_entry(name, action="keep", kernel="torch", quant=None, reason="pinned")
    assert edited is not cpu_plan and edited != cpu_plan
    assert edited.entry(name).action == "keep" and edited.entry(name).reason == "pinned"
    assert cpu_plan.entry(name).action == "quantize"  # the original is untouched
    assert [e.name for e in edited.entries] == [e.name for e in cpu_plan.entries]
    changed = [a.name for a, b in zip(cpu_plan.entries, edited.entries) if a != b]
    assert changed == [name]
    assert Plan.from_json(edited.to_json()) == edited


def test_with_entry_on_a_fused_member_unfuses_its_group(cpu_plan):
    k = "model.layers.0.self_attn.k_proj"
    edited = cpu_plan.with_entry(k, action="keep", kernel="torch", quant=None)
    assert len(edited.fusions) == len(cpu_plan.fusions) - 1
    assert not any(k in f.members for f in edited.fusions)
    for other in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        assert "fused" not in edited.entry(other).kernel and edited.entry(other).action == "quantize"
    # the other layer's group is untouched
    assert edited.entry("model.layers.1.self_attn.k_proj") == cpu_plan.entry("model.layers.1.self_attn.k_proj")


def test_with_entry_unknown_name_or_field(cpu_plan):
    with pytest.raises(KeyError):
        cpu_plan.with_entry("model.layers.9.mlp", action="keep")
    with pytest.raises(TypeError):
        cpu_plan.with_entry("lm_head", colour="red")


def test_lookups(cpu_plan):
    assert cpu_plan.entry("lm_head").role == "lm_head"
    with pytest.raises(KeyError):
        cpu_plan.entry("nope")
    actions = {"quantize", "swap", "keep", "skip"}
    assert sum(len(cpu_plan.by_action(a)) for a in actions) == len(cpu_plan.entries)


def test_plan_is_frozen(cpu_plan):
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu_plan.device = "cuda"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu_plan.entries[0].action = "keep"
