"""The command line's option handling (plans of a config-only model: no weights, no timing)."""
from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from hetero_llm.cli import main


@pytest.fixture
def config_dir(tmp_path):
    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    return tmp_path


def test_plan_with_structured_pruning_describes_the_pruned_model(config_dir, capsys):
    assert main(["plan", str(config_dir), "--prune", "structured", "--hardware", "cpu-2core", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["options"]["prune"]["method"] == "structured"
    down = next(e for e in plan["entries"] if e["name"] == "model.layers.0.mlp.down_proj")
    assert down["prune"] == "structured: 96 of 128 MLP channels" and down["params"] == 64 * 96


def test_plan_with_2_4_marks_every_decoder_linear(config_dir, capsys):
    assert main(["plan", str(config_dir), "--prune", "2:4", "--hardware", "cpu-2core", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    pruned = {e["name"] for e in plan["entries"] if e["prune"]}
    assert len(pruned) == 2 * 7 and "lm_head" not in pruned


def test_a_bad_prune_value_is_a_typed_error_with_a_suggestion(config_dir, capsys):
    assert main(["plan", str(config_dir), "--prune", "wandaa", "--hardware", "cpu-2core"]) != 0
    err = capsys.readouterr().err
    assert "InvalidOptionError" in err and "wanda" in err


def test_inspect_measure_redoes_the_cached_measurements(monkeypatch, tmp_path, capsys):
    from hetero_llm import measure
    from hetero_llm.quant import cpu_prefill

    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_prefill, "available", lambda: ("bf16", "fp32"))
    monkeypatch.setattr(cpu_prefill, "measure", lambda shape: {"bf16": 1.0, "fp32": 3.0})
    costs = measure.DeviceCosts(device="cpu", source="measured", read_gbs=20.0, op_us=5.0,
                                linears={"torch:float32": measure.LinearCost(6.0, 18.0, 20.0, 150.0)})
    calls = []
    monkeypatch.setattr(measure, "measure_cpu", lambda: calls.append(1) or costs)
    assert main(["inspect", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "INT8 prompt GEMM" in out and "-> bf16" in out and "memory read 20.0 GB/s" in out
    assert calls == [1]
    saved = json.loads(next((tmp_path / "machine").glob("cpu-prefill-*.json")).read_text())
    assert saved["strategy"] == {"small": "bf16", "large": "bf16"}
    assert any((tmp_path / "machine").glob("cpu-*.json"))
