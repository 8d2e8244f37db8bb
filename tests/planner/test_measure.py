"""The per-machine cost cache: measured once, reused, refreshed on request, and skippable."""
from __future__ import annotations

import json

import pytest

from hetero_llm.hardware import hardware_profile, inspect_hardware
from hetero_llm.planner import cost, measure
from hetero_llm.planner.measure import DeviceCosts, LinearCost


def fake_costs() -> DeviceCosts:
    return DeviceCosts("cpu", "measured", 40.0, 1.0, {"torch:float32": LinearCost(5.0, 20.0, 25.0, 150.0)},
                       {"sdpa": 300.0, "rotary": 200.0}, {"sdpa": 150.0, "rotary": 100.0}, {"torch": 10.0})


@pytest.fixture
def counted(monkeypatch, tmp_path):
    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path))
    monkeypatch.delenv("HETERO_LLM_MEASURE", raising=False)
    calls = []
    monkeypatch.setattr(measure, "measure_cpu", lambda: calls.append(1) or fake_costs())
    return calls, tmp_path


def test_measured_once_then_cached(counted):
    calls, tmp_path = counted
    hw = inspect_hardware()
    first = measure.cached_cpu_costs(hw)
    again = measure.cached_cpu_costs(hw)
    assert first == again == fake_costs() and len(calls) == 1
    (path,) = (tmp_path / "machine").glob("cpu-*.json")
    assert DeviceCosts.from_dict(json.loads(path.read_text())) == fake_costs()
    measure.cached_cpu_costs(hw, refresh=True)
    assert len(calls) == 2


def test_damaged_cache_is_measured_again(counted):
    calls, tmp_path = counted
    hw = inspect_hardware()
    measure.cached_cpu_costs(hw)
    (path,) = (tmp_path / "machine").glob("cpu-*.json")
    path.write_text("{not json")
    assert measure.cached_cpu_costs(hw) == fake_costs() and len(calls) == 2


def test_measuring_can_be_turned_off(counted, monkeypatch):
    calls, _ = counted
    monkeypatch.setenv("HETERO_LLM_MEASURE", "0")
    assert measure.cached_cpu_costs(inspect_hardware()) is None
    assert cost.device_costs(inspect_hardware(), "cpu").source == "table" and not calls


def test_profiles_use_tables_and_never_measure(counted):
    calls, _ = counted
    assert cost.device_costs(hardware_profile("cpu-8core"), "cpu").source == "table"
    assert cost.device_costs(hardware_profile("h100-80gb"), "cuda").source == "table"
    assert not calls


def test_bandwidth_is_interpolated_by_weight_size():
    c = LinearCost(call_us=10.0, gbs=10.0, gbs_large=40.0, gemm_gflops=100.0)
    small, large = 1024 * 1024, 2048 * 4096
    assert c.bandwidth(small / 4) == 10.0 and c.bandwidth(large * 4) == 40.0
    assert 10.0 < c.bandwidth(2 * small) < 40.0
    assert c.decode_us(1e6, small) == pytest.approx(10.0 + 1e6 / 10e3)
