"""Tests for hetero_llm.hardware: inspection, profiles, validation, JSON, display."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from hetero_llm import hardware as hw
from hetero_llm.errors import HardwareError
from hetero_llm.hardware import (PROFILES, CPUInfo, DistributedInfo, GPUInfo, Hardware,
                                 TritonInfo, hardware_profile, inspect_hardware)

ALL_PROFILES = PROFILES + ("cpu-2core", "cpu-8core-32gb", "h100-80gbx8", "rtx4090-24gbx2")

SAMPLE_FLAGS = (
    "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw "
    "avx512vl avx512_bf16 avx512_fp16 avx512_vnni avx_vnni amx_tile amx_bf16 amx_int8 sha_ni"
)
SAMPLE_CPUINFO = f"""processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
cpu MHz\t\t: 2000.000
flags\t\t: {SAMPLE_FLAGS}

processor\t: 1
model name\t: should not be read
"""


def _cpu(**changes) -> CPUInfo:
    fields = dict(model="Test CPU <x86>", physical_cores=4, logical_cores=8, isa=("avx2", "fma"),
                  memory_bytes=16 * hw.GIB, memory_bandwidth_gbs=60.0, peak_gflops_fp32=320.0,
                  peak_gflops_bf16=320.0, peak_gops_int8=640.0)
    fields.update(changes)
    return CPUInfo(**fields)


def _gpu(index: int = 0, **changes) -> GPUInfo:
    fields = dict(index=index, name="Test GPU & Co", compute_capability=(8, 6), sm_count=84,
                  memory_bytes=24 * hw.GIB, memory_bandwidth_gbs=936.0, peak_tflops_bf16=71.0,
                  peak_tops_int8=284.0)
    fields.update(changes)
    return GPUInfo(**fields)


# ------------------------------------------------------------------ inspection

def test_inspect_hardware_sane_values():
    h = inspect_hardware()
    assert h.source == "inspected" and h.name == "this machine"
    c = h.cpu
    assert 1 <= c.physical_cores <= c.logical_cores
    assert c.memory_bytes > 0 and c.memory_bandwidth_gbs > 0
    assert isinstance(c.isa, tuple) and list(c.isa) == sorted(set(c.isa))
    assert set(c.isa) <= hw.ISA_NAMES
    assert c.peak_gflops_bf16 >= c.peak_gflops_fp32 > 0 and c.peak_gops_int8 > c.peak_gflops_fp32
    assert c.memory_bandwidth_gbs <= 200.0
    assert 1 <= h.distributed.local_world_size <= h.distributed.world_size
    if not torch.cuda.is_available():  # GPU specifics only where there is no GPU to report
        assert h.gpus == () and not h.has_gpu
        assert not h.triton.can_run_gpu_kernels


def test_inspect_hardware_reads_distributed_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a real process group overrides the environment")
    assert hw._distributed_info() == DistributedInfo(False, None, 4, 3, 2)
    monkeypatch.setenv("WORLD_SIZE", "not a number")
    assert hw._distributed_info() == DistributedInfo(False, None, 1, 0, 1)


def test_normalize_isa_from_flags():
    isa = hw._normalize_isa(SAMPLE_FLAGS.split())
    assert isa == ("amx", "amx_bf16", "amx_int8", "avx", "avx2", "avx512", "avx512_bf16",
                   "avx512_fp16", "fma", "vnni")
    assert hw._normalize_isa(["fp", "asimd", "sve", "ASIMD"]) == ("neon", "sve")
    assert hw._normalize_isa(["avx_vnni"]) == ("vnni",)
    assert hw._normalize_isa([]) == ()


def test_parse_cpuinfo_reads_first_processor_only():
    info = hw._parse_cpuinfo(SAMPLE_CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["mhz"] == 2000.0
    assert "avx512f" in info["flags"]
    arm = hw._parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd evtstrm sve\n")
    assert arm["model"] is None and hw._normalize_isa(arm["flags"]) == ("neon", "sve")


def test_cpu_estimates_follow_isa():
    est = hw._cpu_estimates(10, 2.0, ("avx", "avx2", "avx512", "fma"))
    assert est["peak_gflops_fp32"] == 10 * 2.0 * 64
    assert est["peak_gflops_bf16"] == est["peak_gflops_fp32"]
    assert est["peak_gops_int8"] == 2 * est["peak_gflops_fp32"]
    amx = hw._cpu_estimates(100, 2.0, ("amx_bf16", "amx_int8", "avx512", "vnni"))
    assert amx["memory_bandwidth_gbs"] == 200.0
    assert amx["peak_gflops_bf16"] == 16 * amx["peak_gflops_fp32"]
    assert amx["peak_gops_int8"] == 32 * amx["peak_gflops_fp32"]
    assert hw._cpu_estimates(1, 2.5, ())["peak_gflops_fp32"] == 1 * 2.5 * 8


def test_gpu_from_props_uses_clock_then_table_then_default():
    class Props:
        name, major, minor, multi_processor_count, total_memory = "NVIDIA H100 PCIe", 9, 0, 114, 1
    assert hw._gpu_from_props(0, Props()).memory_bandwidth_gbs == 2000.0
    Props.memory_clock_rate, Props.memory_bus_width = 2_619_000, 5120  # kHz, bits
    assert hw._gpu_from_props(0, Props()).memory_bandwidth_gbs == pytest.approx(3352.3, abs=0.1)
    Props.name, Props.memory_clock_rate = "Mystery GPU", 0
    g = hw._gpu_from_props(1, Props())
    assert (g.memory_bandwidth_gbs, g.peak_tflops_bf16, g.peak_tops_int8) == (500.0, 114.0, 228.0)


def test_triton_info_without_triton(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    info = hw._triton_info((_gpu(compute_capability=(9, 0)),))
    assert info == TritonInfo(False, None, False)


def test_hardware_module_imports_without_triton(monkeypatch):
    # sys.modules[name] = None makes both `import triton` and find_spec("triton") fail.
    monkeypatch.setitem(sys.modules, "triton", None)
    path = Path(hw.__file__)
    spec = importlib.util.spec_from_file_location("hetero_llm._hardware_no_triton", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # a private copy, so the real module's classes stay put
    assert module._triton_info(()).available is False
    assert module.inspect_hardware().triton.available is False


# ------------------------------------------------------------------ profiles

@pytest.mark.parametrize("name", ALL_PROFILES)
def test_profiles_load_and_round_trip(name):
    h = hardware_profile(name)
    assert h.source == "profile" and h.name == name
    assert Hardware.from_json(h.to_json()) == h
    assert Hardware.from_dict(h.to_dict()) == h
    assert Hardware.from_profile(name.upper()) == h  # case-insensitive
    if h.has_gpu:
        assert h.triton == TritonInfo(True, None, True)
        assert [g.index for g in h.gpus] == list(range(len(h.gpus)))


def test_profile_tables():
    h100 = hardware_profile("h100-80gb")
    (g,) = h100.gpus
    assert (g.compute_capability, g.sm_count, g.memory_bytes) == ((9, 0), 132, 80 * 2**30)
    assert (g.memory_bandwidth_gbs, g.peak_tflops_bf16, g.peak_tops_int8) == (3350, 989, 1979)
    assert {"avx512", "vnni", "amx_bf16", "amx_int8"} <= set(h100.cpu.isa)
    assert h100.cpu.physical_cores == 32 and h100.cpu.memory_bytes == 512 * 2**30
    assert hardware_profile("h200-141gb").gpus[0].memory_bytes == 141 * 10**9
    assert hardware_profile("a100-80gb").gpus[0].memory_bandwidth_gbs == 2039
    rtx = hardware_profile("rtx4090-24gb")
    assert rtx.gpus[0].compute_capability == (8, 9) and "avx512" not in rtx.cpu.isa


def test_cpu_profile_parsing():
    h = hardware_profile("cpu-8core-32gb")
    assert h.cpu.physical_cores == 8 and h.cpu.memory_bytes == 32 * 2**30
    assert {"avx512", "avx512_bf16", "vnni"} <= set(h.cpu.isa)
    assert h.gpus == () and not h.has_gpu and h.triton.available is False
    assert hardware_profile("CPU-2core").cpu.memory_bytes == 8 * 2**30  # 4 GiB per core


def test_multi_gpu_profile():
    h = hardware_profile("h100-80gbx4")
    assert len(h.gpus) == 4 and [g.index for g in h.gpus] == [0, 1, 2, 3]
    assert {g.name for g in h.gpus} == {hardware_profile("h100-80gb").gpus[0].name}


@pytest.mark.parametrize("name", ["tpu-v5", "h100-80gbx0", "cpu-0core", "cpu-core", "", None])
def test_unknown_profile_raises_with_list(name):
    with pytest.raises(HardwareError) as err:
        hardware_profile(name)
    if name in ("tpu-v5", "cpu-core", ""):
        message = str(err.value)
        assert all(p in message for p in PROFILES) and "cpu-<N>core" in message


# ------------------------------------------------------------------ by hand, validation, JSON

def test_hand_built_hardware():
    h = Hardware(name="my box", cpu=_cpu(), gpus=(_gpu(0), _gpu(1)))
    assert h.source == "manual" and h.has_gpu and len(h.gpus) == 2
    assert h.triton == TritonInfo(False, None, False)
    assert h.distributed == DistributedInfo(False, None, 1, 0, 1)
    assert Hardware.from_json(h.to_json()) == h
    assert Hardware(name="box", cpu=_cpu(), gpus=[_gpu()]).gpus == (_gpu(),)  # list accepted
    assert _cpu(isa=["fma", "avx2", "fma"]).isa == ("avx2", "fma")  # canonical: sorted, unique


@pytest.mark.parametrize("make, field", [
    (lambda: _cpu(physical_cores=0), "physical_cores"),
    (lambda: _cpu(memory_bytes=0), "memory_bytes"),
    (lambda: _cpu(memory_bandwidth_gbs=-1.0), "memory_bandwidth_gbs"),
    (lambda: _cpu(memory_bandwidth_gbs=float("nan")), "memory_bandwidth_gbs"),
    (lambda: _cpu(physical_cores=True), "physical_cores"),
    (lambda: _cpu(isa=("avx512f",)), "isa"),
    (lambda: _cpu(logical_cores=2), "logical_cores"),
    (lambda: _gpu(compute_capability=(8,)), "compute_capability"),
    (lambda: _gpu(sm_count=0), "sm_count"),
    (lambda: TritonInfo(False, None, True), "can_run_gpu_kernels"),
    (lambda: DistributedInfo(False, None, 2, 2, 1), "rank"),
    (lambda: Hardware(name="", cpu=_cpu()), "name"),
    (lambda: Hardware(name="x", cpu="a cpu"), "cpu"),
    (lambda: Hardware(name="x", cpu=_cpu(), source="guess"), "source"),
])
def test_invalid_values_raise_naming_field(make, field):
    with pytest.raises(HardwareError, match=field):
        make()


def test_round_trip_inspected():
    h = inspect_hardware()
    text = h.to_json()
    assert Hardware.from_json(text) == h
    assert json.loads(text) == h.to_dict()
    assert isinstance(Hardware.from_dict(h.to_dict()).cpu.isa, tuple)


def test_from_dict_names_bad_field():
    d = hardware_profile("h100-80gbx2").to_dict()
    d["gpus"][1]["sm_count"] = "many"
    with pytest.raises(HardwareError, match=r"gpus\[1\].*sm_count"):
        Hardware.from_dict(d)
    d = hardware_profile("cpu-2core").to_dict()
    del d["cpu"]["isa"]
    with pytest.raises(HardwareError, match="cpu.*isa"):
        Hardware.from_dict(d)
    with pytest.raises(HardwareError, match="colour"):
        Hardware.from_dict({**hardware_profile("cpu-2core").to_dict(), "colour": "red"})
    with pytest.raises(HardwareError):
        Hardware.from_json("{not json")
    minimal = {"name": "m", "cpu": _cpu().__dict__}
    assert Hardware.from_dict(minimal) == Hardware("m", _cpu())


# ------------------------------------------------------------------ display

def test_str_and_html_mention_cpu_and_gpus():
    h = Hardware(name="my box", cpu=_cpu(), gpus=(_gpu(0), _gpu(1, name="Other GPU")))
    text = str(h)
    assert "Test CPU <x86>" in text and "Test GPU & Co" in text and "Other GPU" in text
    assert "sm_86" in text and "16.0 GiB" in text and "Triton" in text and "world 1" in text
    page = h._repr_html_()
    assert "Test CPU &lt;x86&gt;" in page and "Test GPU &amp; Co" in page and "<table>" in page
    h100 = hardware_profile("h100-80gb")
    assert "NVIDIA H100" in str(h100) and "NVIDIA H100" in h100._repr_html_()
    assert inspect_hardware().cpu.model in str(inspect_hardware())
