"""The cost model against a measured benchmark: predicted decode speed of SmolLM2 within ±25% of
what was measured on this kind of machine, for every quantization option.

The measurements are the committed result of `hetero-llm check-predictions --json
benchmarks/results/cpu_predictions.json` (2-core AVX-512 VNNI CPU). It stores the device costs the
planner measured there and the model's config, so the predictions are recomputed here, with the
current cost model and no timing: a change to the cost model that breaks the predictions fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetero_llm.evaluate.predictions import OPTIONS, TOLERANCE, repredict

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu_predictions.json"


@pytest.fixture(scope="module")
def check() -> dict:
    return json.loads(RESULT.read_text())


def test_every_option_was_measured(check):
    assert set(check["measured_ms"]) == set(OPTIONS)


def test_predictions_within_tolerance_of_the_measured_benchmark(check):
    predicted = repredict(check)
    errors = {label: predicted[label] / check["measured_ms"][label] - 1 for label in check["measured_ms"]}
    bad = {k: f"{100 * v:+.1f}%" for k, v in errors.items() if abs(v) > TOLERANCE}
    assert not bad, f"predictions off by more than ±{100 * TOLERANCE:.0f}%: {bad}"


def test_stored_predictions_match_the_recomputed_ones(check):
    # The stored predictions were made by the same code path on the machine that measured.
    predicted = repredict(check)
    for label, ms in check["predicted_ms"].items():
        assert predicted[label] == pytest.approx(ms, rel=1e-6), label
