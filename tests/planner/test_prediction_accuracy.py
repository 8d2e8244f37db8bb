"""The cost model against measured benchmarks: predicted decode and prompt speed within ±25% of
what was measured on this kind of machine, for SmolLM2 (every quantization option) and a
1B-class Llama shape.

The measurements are the committed results of `hetero-llm check-predictions --json
benchmarks/results/cpu_predictions*.json` (2-core AVX-512 VNNI CPU; the first measurement of
the machine ran while another process kept one core busy, see docs/planner.md). Each stores the
device costs the planner measured there and the model's config, so the predictions are
recomputed here, with the current cost model and no timing: a change to the cost model that
breaks the predictions fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetero_llm.evaluate.predictions import OPTIONS, TOLERANCE, repredict, repredict_prefill

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
FILES = ["cpu_predictions.json", "cpu_predictions_llama-1b.json"]


@pytest.fixture(scope="module", params=FILES)
def check(request) -> dict:
    return json.loads((RESULTS / request.param).read_text())


def test_smollm2_measured_every_option():
    check = json.loads((RESULTS / FILES[0]).read_text())
    assert set(check["measured_ms"]) == set(OPTIONS) == set(check["measured_prefill_ms"])


def test_the_costs_were_measured_busy_first_then_again_quiet(check):
    # The stored costs are those the quiet process measured after finding the busy ones.
    assert check["costs"]["source"] == "measured" and check["costs"]["others_cores"] < 0.25


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_predictions_within_tolerance_of_the_measured_benchmark(check, phase):
    predicted, measured = ((repredict(check), check["measured_ms"]) if phase == "decode"
                           else (repredict_prefill(check), check["measured_prefill_ms"]))
    assert measured, "the benchmark timed this phase"
    errors = {label: predicted[label] / measured[label] - 1 for label in measured}
    bad = {k: f"{100 * v:+.1f}%" for k, v in errors.items() if abs(v) > TOLERANCE}
    assert not bad, f"{phase} predictions off by more than ±{100 * TOLERANCE:.0f}%: {bad}"


def test_stored_predictions_match_the_recomputed_ones(check):
    # The stored predictions were made by the same code path on the machine that measured.
    for stored, predicted in ((check["predicted_ms"], repredict(check)),
                              (check["predicted_prefill_ms"], repredict_prefill(check))):
        for label, ms in stored.items():
            assert predicted[label] == pytest.approx(ms, rel=1e-6), label


def test_an_unknown_option_is_a_typed_error_before_anything_loads():
    from hetero_llm.errors import InvalidOptionError
    from hetero_llm.evaluate.predictions import check_predictions
    with pytest.raises(InvalidOptionError, match="unknown options.*int4"):
        check_predictions("smollm2", labels=["original", "int4"])
