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
