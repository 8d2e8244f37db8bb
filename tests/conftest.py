"""Tests plan from stored CPU costs, not from measuring the machine they run on.

`tests/data/cpu_costs.json` holds the costs `hetero_llm/measure.py` measured on the reference
machine (2-core AMD EPYC, AVX-512 VNNI; the `costs` of benchmarks/results/cpu_predictions.json).
Every test that plans for "this machine" gets them, so plans do not depend on how fast or how
busy the test machine is, and no test spends ~30 s measuring. Tests of the measuring itself
opt out with `@pytest.mark.measures_cpu` (or a module-level `pytestmark`). Subprocesses (the CLI,
the docs' commands) measure as a user's process would, once per machine (cached).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

STORED_COSTS = Path(__file__).parent / "data" / "cpu_costs.json"


def pytest_configure(config):
    config.addinivalue_line("markers", "measures_cpu: the test measures this CPU (no stored costs)")


@pytest.fixture(autouse=True)
def stored_cpu_costs(request, monkeypatch):
    if request.node.get_closest_marker("measures_cpu"):
        yield
        return
    from hetero_llm import measure
    from hetero_llm.planner.device_costs import DeviceCosts

    costs = DeviceCosts.from_dict(json.loads(STORED_COSTS.read_text()))
    monkeypatch.setattr(measure, "measured_cpu_costs",
                        lambda hardware: costs if hardware.source == "inspected" else None)
    yield
