"""The per-machine cost cache: measured once, reused, refreshed on request, skippable, and
measured again when it was taken on a busy machine or no longer matches the machine."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetero_llm import _cpu_load, measure
from hetero_llm.hardware import hardware_profile, inspect_hardware
from hetero_llm.planner import cost
from hetero_llm.planner.device_costs import DeviceCosts, LinearCost

pytestmark = pytest.mark.measures_cpu  # these test the measuring and its cache themselves


def fake_costs() -> DeviceCosts:
    return DeviceCosts("cpu", "measured", 40.0, 1.0, {"torch:float32": LinearCost(5.0, 20.0, 25.0, 150.0)},
                       {"sdpa": 300.0, "rotary": 200.0}, {"sdpa": 150.0, "rotary": 100.0}, {"torch": 10.0})


@pytest.fixture
def counted(monkeypatch, tmp_path):
    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path))
    monkeypatch.delenv("HETERO_LLM_MEASURE", raising=False)
    monkeypatch.setattr(measure, "_CHECKED", set())
    calls = []
    monkeypatch.setattr(measure, "measure_cpu", lambda: calls.append(1) or fake_costs())
    return calls, tmp_path


class FakeLoad:
    """OtherLoad with a chosen reading."""

    cores = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def busy(self):
        return self.cores >= _cpu_load.BUSY_CORES


def cache_with(tmp_path: Path, **changes) -> Path:
    """A cache file as measure_cpu would have written it, with `changes`."""
    path = tmp_path / "machine" / f"cpu-{measure.machine_key(inspect_hardware())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.replace(fake_costs(), **changes).to_dict()))
    return path


@pytest.mark.parametrize("others_now, others_then, probe_now, measured_again", [
    (0.0, 0.0, 1000.0, False),  # quiet then and now, same speed: kept
    (0.0, 1.0, 1000.0, True),   # taken while another process held a core, quiet now
    (0.0, None, 1000.0, False),  # load unknown then (not Linux), same speed
    (1.0, 1.0, 1000.0, False),  # busy now: measuring now would not be better
    (0.0, 0.0, 600.0, True),    # the machine runs much faster than when measured
    (0.0, 0.0, 1500.0, False),  # slower with nothing of ours busy: a noisy host; the best is kept
    (0.0, 0.0, 1200.0, False),  # within the drift of a shared machine
])
def test_cache_is_checked_against_the_machine_once(counted, monkeypatch, others_now, others_then, probe_now,
                                                   measured_again):
    calls, tmp_path = counted
    cache_with(tmp_path, probe_us=1000.0, others_cores=others_then)
    monkeypatch.setattr(FakeLoad, "cores", others_now)
    monkeypatch.setattr(measure, "OtherLoad", FakeLoad)
    probes = []
    monkeypatch.setattr(measure, "probe_us", lambda: probes.append(1) or probe_now)
    hw = inspect_hardware()
    measure.cached_cpu_costs(hw)
    measure.cached_cpu_costs(hw)
    assert len(calls) == int(measured_again) and len(probes) == 1


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc/stat")
def test_other_load_sees_a_process_spinning_on_our_cores():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with _cpu_load.OtherLoad() as load:
            time.sleep(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert load.cores is not None and load.cores >= 0.3 and load.busy


def test_other_load_of_a_block_shorter_than_a_few_ticks_is_unknown(monkeypatch):
    # One 10 ms tick of anyone's work over a 1 ms block read as 10 busy cores (a flaky test here).
    ticks = iter([100.0, 100.01])
    monkeypatch.setattr(_cpu_load, "_busy_seconds", lambda cpus: next(ticks))
    with _cpu_load.OtherLoad() as load:
        pass
    assert load.cores is None and not load.busy


def test_prompt_gemm_choice_timed_busy_is_timed_again(monkeypatch, tmp_path):
    from hetero_llm.quant import cpu_prefill
    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_prefill, "available", lambda: ("bf16", "fp32"))
    monkeypatch.setattr(cpu_prefill, "measure", lambda shape: {"bf16": 1.0, "fp32": 3.0})
    path = cpu_prefill._cache_path()
    path.parent.mkdir(parents=True)
    busy = {"strategy": {"small": "fp32", "large": "fp32"}, "others_cores": 1.0}
    for saved, expected in ((busy, "bf16"), ({**busy, "others_cores": 0.0}, "fp32")):
        path.write_text(json.dumps(saved))
        cpu_prefill.chosen.cache_clear()
        try:
            assert cpu_prefill.chosen() == {"small": expected, "large": expected}
        finally:
            cpu_prefill.chosen.cache_clear()


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
    hw = inspect_hardware()
    assert cost.device_costs(hw, "cpu", measure.measured_cpu_costs(hw)).source == "table" and not calls


def test_profiles_use_tables_and_never_measure(counted):
    calls, _ = counted
    for name, device in (("cpu-8core", "cpu"), ("h100-80gb", "cuda")):
        hw = hardware_profile(name)
        assert cost.device_costs(hw, device, measure.measured_cpu_costs(hw)).source == "table"
    assert not calls


def test_bandwidth_is_interpolated_by_weight_size():
    c = LinearCost(call_us=10.0, gbs=10.0, gbs_large=40.0, gemm_gflops=100.0)
    small, large = 1024 * 1024, 2048 * 4096
    assert c.bandwidth(small / 4) == 10.0 and c.bandwidth(large * 4) == 40.0
    assert 10.0 < c.bandwidth(2 * small) < 40.0
    assert c.decode_us(1e6, small) == pytest.approx(10.0 + 1e6 / 10e3)


def test_a_plan_made_from_busy_figures_says_so(counted):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetero_llm import plan
    calls, tmp_path = counted
    cache_with(tmp_path, others_cores=1.0, probe_us=0.0)
    measure._CHECKED.add(str(next((tmp_path / "machine").glob("cpu-*.json"))))  # no re-check here
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    notes = plan(model, hardware=inspect_hardware(), quantize="int8").notes
    assert any("other processes used 1.0 cores" in n for n in notes) and not calls


@pytest.mark.parametrize("decode", ["transformers", "native"])
def test_the_tiny_models_measured_are_accelerated_through_the_pipeline(decode):
    # What _block_costs times: the tiny Llama as accelerate() would make it, without measuring again.
    import copy

    import torch

    from hetero_llm.fused.modules import GatedMLP, RotaryAttention
    if decode == "native" and not measure._native_possible():
        pytest.skip("no native CPU decode step built here")
    model = measure._tiny_llama(2)
    original = copy.deepcopy(model)
    fast = measure._accelerated(model, quantize="int8", decode=decode)
    layer = fast.model.layers[0]
    assert isinstance(layer.self_attn, RotaryAttention) and isinstance(layer.mlp, GatedMLP)
    assert fast.hetero_plan.model_settings["decode"] == decode
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(ids).logits, fast(ids).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
