"""What the machine has: CPU, GPUs, Triton, torch.distributed.

`inspect_hardware()` reads this machine cheaply (no benchmarks); `hardware_profile(name)` builds
a named machine from tables so plans can be made for hardware you are not on; `Hardware(...)`
can also be built by hand. Everything is frozen, validated, and round-trips through JSON.
"""
from __future__ import annotations

import dataclasses
import html
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import psutil
import torch

from .errors import HardwareError, HeteroLLMWarning

GIB = 2**30
ISA_NAMES = frozenset({"avx", "avx2", "fma", "avx512", "avx512_bf16", "avx512_fp16", "vnni",
                       "amx", "amx_bf16", "amx_int8", "neon", "sve"})
# Linux /proc/cpuinfo flag (x86 "flags", Arm "Features") -> our normalized name.
_FLAG_TO_ISA = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "avx512f": "avx512",
    "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16",
    "avx512_vnni": "vnni", "avx512vnni": "vnni", "avx_vnni": "vnni",
    "amx_tile": "amx", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
    "asimd": "neon", "neon": "neon", "sve": "sve",
}
_DEFAULT_GHZ = 2.5


_NONNEG_INTS = {"index", "rank"}  # every other int field must be >= 1
# Field annotation (a string, thanks to `from __future__ import annotations`) -> check kind.
_KINDS = {"int": "int", "float": "float", "str": "str", "bool": "bool", "str | None": "opt_str",
          "tuple[str, ...]": "isa", "tuple[int, int]": "cc"}


def _coerce(label: str, value: Any, kind: str, minimum: int = 1) -> Any:
    """Check one field value against its kind and return its canonical form, or raise."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int":
        ok, want, out = is_int and value >= minimum, f"an int >= {minimum}", value
    elif kind == "float":
        ok = (is_int or isinstance(value, float)) and math.isfinite(value) and value > 0
        want, out = "a finite number > 0", float(value) if ok else None
    elif kind in ("str", "bool"):
        ok, want, out = isinstance(value, str if kind == "str" else bool), f"a {kind}", value
    elif kind == "opt_str":
        ok, want, out = value is None or isinstance(value, str), "a str or None", value
    elif kind == "isa":
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v in ISA_NAMES
                                                        for v in value)
        want = f"a sequence of names from {sorted(ISA_NAMES)}"
        out = ok and tuple(sorted(set(value)))
    else:  # "cc": a (major, minor) compute capability
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        want, out = "a (major, minor) pair of ints >= 0", ok and tuple(value)
    if not ok:
        raise HardwareError(f"{label} must be {want}, got {value!r}")
    return out


class _Validated:
    """Mixin for the frozen leaf dataclasses: checks every field from its annotation."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            minimum = 0 if f.name in _NONNEG_INTS else 1
            value = _coerce(f"{type(self).__name__}.{f.name}", getattr(self, f.name),
                            _KINDS[f.type], minimum)
            object.__setattr__(self, f.name, value)  # frozen: store canonical (list -> tuple)
        self._check()

    def _check(self) -> None:
        """Cross-field rules; single fields are already checked."""

    def _require(self, ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise HardwareError(f"{type(self).__name__}.{field} must be {rule}, "
                                f"got {getattr(self, field)!r}")


@dataclass(frozen=True)
class CPUInfo(_Validated):
    """The host CPU and RAM. Bandwidth and peak rates are estimates, not measurements."""

    model: str
    physical_cores: int
    logical_cores: int
    isa: tuple[str, ...]
    memory_bytes: int
    memory_bandwidth_gbs: float
    peak_gflops_fp32: float
    peak_gflops_bf16: float
    peak_gops_int8: float

    def _check(self) -> None:
        self._require(self.logical_cores >= self.physical_cores, "logical_cores",
                      f">= physical_cores ({self.physical_cores})")


@dataclass(frozen=True)
class GPUInfo(_Validated):
    """One GPU as torch.cuda sees it; peak rates are datasheet numbers (dense, no sparsity)."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    memory_bandwidth_gbs: float
    peak_tflops_bf16: float
    peak_tops_int8: float


@dataclass(frozen=True)
class TritonInfo(_Validated):
    """Whether Triton is installed, its version, and whether it has a GPU it can compile for."""

    available: bool
    version: str | None
    can_run_gpu_kernels: bool

    def _check(self) -> None:
        self._require(self.available or not self.can_run_gpu_kernels, "can_run_gpu_kernels",
                      "False when available is False")


@dataclass(frozen=True)
class DistributedInfo(_Validated):
    """torch.distributed state, or what the launcher's environment variables announce."""

    initialized: bool
    backend: str | None
    world_size: int
    rank: int
    local_world_size: int

    def _check(self) -> None:
        self._require(self.rank < self.world_size, "rank", f"< world_size ({self.world_size})")
        self._require(self.local_world_size <= self.world_size, "local_world_size",
                      f"<= world_size ({self.world_size})")


def _leaf_from_dict(cls: type, d: Any, where: str) -> Any:
    """Build a leaf dataclass from a dict, naming `where` in any error."""
    if not isinstance(d, Mapping):
        raise HardwareError(f"{where} must be a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
    if missing or unknown:
        raise HardwareError(f"{where}: missing fields {missing}, unknown fields {unknown}")
    try:
        return cls(**d)
    except HardwareError as e:
        raise HardwareError(f"{where}: {e}") from None


_SOURCES = ("inspected", "profile", "manual")


@dataclass(frozen=True)
class Hardware:
    """A machine: CPU, GPUs, Triton and distributed state. Inspected, profiled, or by hand."""

    name: str
    cpu: CPUInfo
    gpus: tuple[GPUInfo, ...] = ()
    triton: TritonInfo = TritonInfo(False, None, False)
    distributed: DistributedInfo = DistributedInfo(False, None, 1, 0, 1)
    source: str = "manual"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise HardwareError(f"Hardware.name must be a non-empty str, got {self.name!r}")
        if isinstance(self.gpus, list):
            object.__setattr__(self, "gpus", tuple(self.gpus))
        if not isinstance(self.gpus, tuple):
            raise HardwareError(f"Hardware.gpus must be a tuple of GPUInfo, got {self.gpus!r}")
        parts = {"cpu": (self.cpu, CPUInfo), "triton": (self.triton, TritonInfo),
                 "distributed": (self.distributed, DistributedInfo)}
        parts.update({f"gpus[{i}]": (g, GPUInfo) for i, g in enumerate(self.gpus)})
        for field, (value, cls) in parts.items():
            if not isinstance(value, cls):
                raise HardwareError(f"Hardware.{field} must be a {cls.__name__}, got {value!r}")
        if self.source not in _SOURCES:
            raise HardwareError(f"Hardware.source must be one of {_SOURCES}, got {self.source!r}")

    @property
    def has_gpu(self) -> bool:
        """True when at least one GPU is present."""
        return bool(self.gpus)

    def to_dict(self) -> dict:
        """Plain JSON types only (tuples become lists); from_dict() restores it exactly."""
        # Through JSON and back so that to_dict() == json.loads(to_json()), lists and all.
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Hardware:
        """Inverse of to_dict(); raises HardwareError naming the first bad field."""
        if not isinstance(d, Mapping):
            raise HardwareError(f"Hardware.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted({"name", "cpu"} - set(d))
        if unknown or missing:
            raise HardwareError(f"Hardware: missing fields {missing}, unknown fields {unknown}")
        gpus = d.get("gpus", [])
        if not isinstance(gpus, (list, tuple)):
            raise HardwareError(f"gpus must be a list, got {type(gpus).__name__}")
        kwargs = {"name": d["name"], "cpu": _leaf_from_dict(CPUInfo, d["cpu"], "cpu"),
                  "gpus": tuple(_leaf_from_dict(GPUInfo, g, f"gpus[{i}]")
                                for i, g in enumerate(gpus))}
        for field, leaf in (("triton", TritonInfo), ("distributed", DistributedInfo)):
            if field in d:
                kwargs[field] = _leaf_from_dict(leaf, d[field], field)
        if "source" in d:
            kwargs["source"] = d["source"]
        return cls(**kwargs)

    def to_json(self) -> str:
        """JSON text of to_dict()."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> Hardware:
        """Inverse of to_json()."""
        try:
            d = json.loads(s)
        except (TypeError, ValueError) as e:
            raise HardwareError(f"Hardware.from_json: not valid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_profile(cls, name: str) -> Hardware:
        """A named machine from tables; same as hardware_profile(name)."""
        return hardware_profile(name)

    def _rows(self) -> list[tuple[str, str]]:
        """(label, text) rows shared by __str__ and _repr_html_."""
        c = self.cpu
        rows = [("CPU", f"{c.model} | {c.physical_cores} cores / {c.logical_cores} threads | "
                        f"ISA {' '.join(c.isa) or 'baseline'} | {c.memory_bytes / GIB:.1f} GiB | "
                        f"~{c.memory_bandwidth_gbs:.0f} GB/s (est.)")]
        for g in self.gpus:
            major, minor = g.compute_capability
            rows.append((f"GPU {g.index}", f"{g.name} | sm_{major}{minor} | {g.sm_count} SMs | "
                                           f"{g.memory_bytes / GIB:.1f} GiB | "
                                           f"{g.memory_bandwidth_gbs:.0f} GB/s"))
        t = self.triton
        rows.append(("Triton", f"{t.version or 'version unknown'} | GPU kernels: "
                               f"{'yes' if t.can_run_gpu_kernels else 'no'}"
                     if t.available else "not installed"))
        dist = self.distributed
        state = f"backend {dist.backend}" if dist.initialized else "not initialized"
        rows.append(("Distributed", f"world {dist.world_size} | rank {dist.rank} | "
                                    f"local {dist.local_world_size} | {state}"))
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(label) for label, _ in rows)
        lines = [f"Hardware: {self.name} ({self.source})"]
        lines += [f"  {label:<{width}}  {text}" for label, text in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
                        f"<td style='text-align:left'>{html.escape(text)}</td></tr>"
                        for label, text in self._rows())
        caption = html.escape(f"Hardware: {self.name} ({self.source})")
        return f"<table><caption>{caption}</caption>{cells}</table>"


# ---------------------------------------------------------------- CPU inspection

def _normalize_isa(flags: Iterable[str]) -> tuple[str, ...]:
    """Map raw /proc/cpuinfo flags to our sorted ISA names; unknown flags are dropped."""
    return tuple(sorted({_FLAG_TO_ISA[f] for f in (x.strip().lower() for x in flags)
                         if f in _FLAG_TO_ISA}))


def _parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model, MHz and flags of the first processor block of /proc/cpuinfo text (pure)."""
    out: dict[str, Any] = {"model": None, "mhz": None, "flags": ()}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not sep:
            continue
        if key == "model name" and value:
            out["model"] = value
        elif key == "cpu mhz":
            try:
                out["mhz"] = float(value)
            except ValueError:
                pass
        elif key in ("flags", "features"):  # x86 says flags, Arm says Features
            out["flags"] = tuple(value.split())
    return out


def _read_cpuinfo() -> dict[str, Any]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return _parse_cpuinfo(f.read())
    except OSError:  # not Linux
        return {"model": None, "mhz": None, "flags": None}


def _isa_from_torch() -> tuple[str, ...]:
    """Fallback when /proc/cpuinfo is missing: torch's dispatch capability."""
    capability = ""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # very old torch or odd build: report a baseline CPU
        pass
    if capability.startswith("AVX512"):
        return ("avx", "avx2", "avx512", "fma")
    if capability == "AVX2":  # ATen's AVX2 level requires FMA as well
        return ("avx", "avx2", "fma")
    if capability.startswith("SVE"):
        return ("neon", "sve")
    return ("neon",) if platform.machine().lower() in ("arm64", "aarch64") else ()


def _core_counts() -> tuple[int, int]:
    """(physical, logical) cores this process may use; affinity caps both (containers, taskset)."""
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    if hasattr(os, "sched_getaffinity"):
        allowed = len(os.sched_getaffinity(0)) or logical
        logical, physical = min(logical, allowed), min(physical, allowed)
    return max(1, min(physical, logical)), max(1, logical)


def _cpu_estimates(cores: int, ghz: float, isa: tuple[str, ...]) -> dict[str, float]:
    """Bandwidth and peak-rate estimates from core count, clock and ISA (no measurement)."""
    # Issue 5 replaces this rule of thumb with a measured memory-bandwidth micro-benchmark.
    bandwidth = min(15.0 * cores, 200.0)
    per_cycle = 64 if "avx512" in isa else 32 if {"avx2", "fma"} <= set(isa) else 8
    fp32 = cores * ghz * per_cycle
    bf16 = fp32 * (16 if "amx_bf16" in isa else 2 if "avx512_bf16" in isa else 1)
    int8 = fp32 * (32 if "amx_int8" in isa else 4 if "vnni" in isa else 2)
    return {"memory_bandwidth_gbs": bandwidth, "peak_gflops_fp32": fp32,
            "peak_gflops_bf16": bf16, "peak_gops_int8": int8}


def _make_cpu(model: str, physical: int, logical: int, isa: Iterable[str], memory_bytes: int,
              ghz: float = _DEFAULT_GHZ) -> CPUInfo:
    isa = tuple(sorted(set(isa)))
    return CPUInfo(model, physical, logical, isa, memory_bytes,
                   **_cpu_estimates(physical, ghz, isa))


def _inspect_cpu() -> CPUInfo:
    info = _read_cpuinfo()
    isa = _normalize_isa(info["flags"]) if info["flags"] is not None else _isa_from_torch()
    model = info["model"] or platform.processor() or platform.machine() or "unknown CPU"
    mhz = info["mhz"]
    ghz = mhz / 1000.0 if mhz and mhz > 0 else _DEFAULT_GHZ
    physical, logical = _core_counts()
    memory = int(psutil.virtual_memory().total) or 4 * GIB
    return _make_cpu(model, physical, logical, isa, memory, ghz)


# ---------------------------------------------------------------- GPU inspection

# (regex on the lowercase name, bandwidth GB/s, bf16 TFLOPS, int8 TOPS): first match wins, so
# specific names come first. Dense datasheet numbers; the T4 has no bf16, so its fp16 is used.
_GPU_TABLE = (
    (r"h100.*pcie", 2000.0, 756.0, 1513.0), (r"h100", 3350.0, 989.0, 1979.0),
    (r"h200", 4800.0, 989.0, 1979.0), (r"a100.*80gb", 2039.0, 312.0, 624.0),
    (r"a100", 1555.0, 312.0, 624.0), (r"4090", 1008.0, 165.0, 661.0),
    (r"\bl4\b", 300.0, 121.0, 242.0), (r"\bt4\b", 320.0, 65.0, 130.0),
)


def _gpu_table_row(name: str) -> tuple[float, float, float] | None:
    return next((tuple(row[1:]) for row in _GPU_TABLE if re.search(row[0], name.lower())), None)


def _bandwidth_from_props(props: Any) -> float | None:
    """Peak DRAM bandwidth from the clock and bus width, when this torch exposes them."""
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock or not bus:
        return None
    if clock < 100_000:  # CUDA reports kHz; a value this small can only be MHz
        clock *= 1000
    return clock * bus * 2 / 8 / 1e6  # kHz * bits, double data rate -> GB/s


def _gpu_from_props(index: int, props: Any) -> GPUInfo:
    name = str(props.name)
    sms = max(1, int(props.multi_processor_count))
    row = _gpu_table_row(name)
    bandwidth = _bandwidth_from_props(props) or (row[0] if row else 500.0)
    bf16 = row[1] if row else float(sms)
    int8 = row[2] if row else 2.0 * bf16
    return GPUInfo(index, name, (int(props.major), int(props.minor)), sms,
                   int(props.total_memory), float(bandwidth), bf16, int8)


def _inspect_gpus() -> tuple[GPUInfo, ...]:
    try:
        if not torch.cuda.is_available():
            return ()
        return tuple(_gpu_from_props(i, torch.cuda.get_device_properties(i))
                     for i in range(torch.cuda.device_count()))
    except Exception as e:  # a broken driver must not break planning; plan for the CPU
        warnings.warn(f"could not query CUDA GPUs ({e}); planning for the CPU only",
                      HeteroLLMWarning, stacklevel=3)
        return ()


# ---------------------------------------------------------------- Triton and distributed

def _triton_version() -> str | None:
    # Nightly and ROCm wheels ship Triton under other distribution names.
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _triton_info(gpus: tuple[GPUInfo, ...]) -> TritonInfo:
    """Triton's presence without importing it (importing triton is slow and may fail)."""
    try:
        available = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a half-installed or stubbed-out package
        available = False
    version = _triton_version() if available else None
    can_run = available and any(g.compute_capability >= (7, 0) for g in gpus)
    return TritonInfo(available, version, can_run)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


def _distributed_info() -> DistributedInfo:
    dist, initialized, backend = torch.distributed, False, None
    try:
        initialized = dist.is_available() and dist.is_initialized()
        if initialized:
            backend, world, rank = str(dist.get_backend()), dist.get_world_size(), dist.get_rank()
    except Exception:  # odd builds: fall back to what the launcher's environment says
        initialized, backend = False, None
    if not initialized:
        world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    world = max(1, world)
    rank = rank if 0 <= rank < world else 0
    local = _env_int("LOCAL_WORLD_SIZE", world)
    local = local if 1 <= local <= world else world
    return DistributedInfo(initialized, backend, world, rank, local)


def inspect_hardware() -> Hardware:
    """Describe this machine (CPU, CUDA GPUs, Triton, distributed) in well under a second.

    Nothing is benchmarked; bandwidths and peak rates are estimates or datasheet numbers.
    Never raises on odd machines: anything unreadable falls back to a sane default.
    """
    gpus = _inspect_gpus()
    return Hardware("this machine", _inspect_cpu(), gpus, _triton_info(gpus),
                    _distributed_info(), source="inspected")


# ---------------------------------------------------------------- named profiles

_SPR = ("avx", "avx2", "fma", "avx512", "avx512_bf16", "avx512_fp16", "vnni",
        "amx", "amx_bf16", "amx_int8")  # Sapphire Rapids class host, as in H100/H200 boxes
_ICX = ("avx", "avx2", "fma", "avx512", "vnni")
_ADL = ("avx", "avx2", "fma", "vnni")
# name -> (GPU name, cc, SMs, memory bytes, GB/s, bf16, int8, (CPU model, cores, ISA, RAM))
_GPU_PROFILES = {
    "h100-80gb": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * GIB, 3350.0, 989.0, 1979.0,
                  ("Intel Xeon (Sapphire Rapids)", 32, _SPR, 512 * GIB)),
    "h200-141gb": ("NVIDIA H200", (9, 0), 132, 141 * 10**9, 4800.0, 989.0, 1979.0,
                   ("Intel Xeon (Sapphire Rapids)", 32, _SPR, 512 * GIB)),
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", (8, 0), 108, 40 * GIB, 1555.0, 312.0, 624.0,
                  ("Intel Xeon (Ice Lake)", 32, _ICX, 512 * GIB)),
    "a100-80gb": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 80 * GIB, 2039.0, 312.0, 624.0,
                  ("Intel Xeon (Ice Lake)", 32, _ICX, 512 * GIB)),
    "rtx4090-24gb": ("NVIDIA GeForce RTX 4090", (8, 9), 128, 24 * GIB, 1008.0, 165.0, 661.0,
                     ("Intel Core (Raptor Lake)", 16, _ADL, 64 * GIB)),
}
PROFILES: tuple[str, ...] = tuple(_GPU_PROFILES)
_CPU_PATTERN = re.compile(r"cpu-(\d+)core(?:-(\d+)gb)?")
_MULTI_PATTERN = re.compile(r"(.+)x(\d+)")


def _gpu_profile(key: str, name: str, count: int) -> Hardware:
    gpu_name, cc, sms, memory, bandwidth, bf16, int8, host = _GPU_PROFILES[key]
    model, cores, isa, ram = host
    gpus = tuple(GPUInfo(i, gpu_name, cc, sms, memory, bandwidth, bf16, int8)
                 for i in range(count))
    return Hardware(name, _make_cpu(model, cores, 2 * cores, isa, ram), gpus,
                    TritonInfo(True, None, True), source="profile")


def _cpu_profile(name: str, cores: int, gib: int | None) -> Hardware:
    memory = (gib if gib is not None else 4 * cores) * GIB
    cpu = _make_cpu(f"generic x86-64 ({cores} cores)", cores, cores,
                    ("avx", "avx2", "fma", "avx512", "avx512_bf16", "vnni"), memory)
    return Hardware(name, cpu, source="profile")


def hardware_profile(name: str) -> Hardware:
    """A named machine built from tables (no inspection); names are case-insensitive.

    Names: those in PROFILES, each optionally suffixed "x<K>" for K identical GPUs
    ("h100-80gbx8"), and "cpu-<N>core" or "cpu-<N>core-<M>gb" for a GPU-less host.
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    if key in _GPU_PROFILES:
        return _gpu_profile(key, key, 1)
    multi = _MULTI_PATTERN.fullmatch(key)
    if multi and multi.group(1) in _GPU_PROFILES and int(multi.group(2)) >= 1:
        return _gpu_profile(multi.group(1), key, int(multi.group(2)))
    cpu = _CPU_PATTERN.fullmatch(key)
    if cpu:
        return _cpu_profile(key, int(cpu.group(1)), int(cpu.group(2)) if cpu.group(2) else None)
    raise HardwareError(
        f"unknown hardware profile {name!r}; known profiles: {', '.join(PROFILES)}; "
        f"add 'x<K>' for K GPUs (e.g. 'h100-80gbx8'), or use 'cpu-<N>core' / "
        f"'cpu-<N>core-<M>gb' (e.g. 'cpu-16core-64gb'), or build Hardware(...) by hand")
