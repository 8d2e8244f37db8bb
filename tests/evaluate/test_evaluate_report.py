"""Table, JSON and chart from a hand-built result (no model needed)."""
from __future__ import annotations

import json
import sys

import pytest

from hetero_llm.errors import HeteroLLMError
from hetero_llm.evaluate import BenchResult, VariantResult, format_table, save_chart, save_json


def _variant(name, decode, prefill, ppl):
    return VariantResult(name, decode, prefill, [decode], [prefill], 538.1, 12.5, ppl)


@pytest.fixture()
def result():
    variants = [
        _variant("original", 20.0, 700.0, 14.0),
        _variant("hetero_llm", 50.0, 1400.0, 14.056),
        _variant("torch-dynamic-int8", 40.0, 1000.0, 44.8),
    ]
    return BenchResult("smollm2", variants, {"repeats": 5, "new_tokens": 64, "prompt_len": 512,
                                             "threads": 2, "ppl_tokens": 8192})


def test_table_has_ratios_against_the_baseline_and_the_peer(result):
    table = format_table(result)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("variant"))
    for column in ("decode tok/s", "vs original", "prefill tok/s", "weights MB",
                   "peak RSS +MB", "perplexity", "ppl vs original"):
        assert column in header
    row = next(line for line in lines if line.startswith("hetero_llm "))
    assert "2.50x" in row and "2.00x" in row and "+0.40%" in row
    assert len({len(line) for line in lines[2:6]}) == 1  # aligned columns
    assert ("hetero_llm vs torch-dynamic-int8: decode 1.25x, prefill 1.40x, "
            "perplexity +0.4% vs +220.0%") in table


def test_table_without_perplexity_or_peer(result):
    for v in result.variants:
        v.perplexity = None
    result.variants.pop()
    table = format_table(result)
    assert " vs torch" not in table and "-" in table.splitlines()[-1]


def test_json_and_chart(result, tmp_path):
    data = json.loads(save_json(result, tmp_path / "out" / "bench.json").read_text())
    assert data["baseline"] == "original" and len(data["variants"]) == 3
    png = save_chart(result, tmp_path / "out" / "bench.png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_without_matplotlib_says_what_to_install(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(HeteroLLMError, match="pip install matplotlib"):
        save_chart(result, tmp_path / "x.png")
