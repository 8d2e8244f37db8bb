"""The native CPU decode step (cpu_decode.cpp): build it for this CPU's instruction set, once.

Two builds of one source: AVX-512 VNNI, and AVX2 (+FMA), for the x86 CPUs without AVX-512
(most laptops, AMD Zen 2/3). The best one the CPU has is used; `HETERO_LLM_CPU_ISA` caps it
("avx2" runs the AVX2 build on an AVX-512 machine, "none" turns it off), so the lower level can
be tested on any machine. `HETERO_LLM_NO_CPP_KERNELS=1` turns off every compiled kernel.

torch.utils.cpp_extension compiles it with the system g++ and ninja the first time (~20-40 s on
2 cores) into torch's extension cache, so later processes load it in well under a second;
`build_seconds()` says what this process paid.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ._build import clear_stale_lock

from ..errors import InvalidOptionError
from ..hardware import inspect_hardware

log = logging.getLogger("hetero_llm")

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
HEADER = Path(__file__).with_name("cpu_vector.h")  # included by SOURCE
ISA_ENV = "HETERO_LLM_CPU_ISA"
# Build flags, and the instruction sets (hardware.CPUInfo.isa names) each build needs, best first.
BUILDS = {
    "avx512_vnni": (["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma"], ("avx512", "vnni")),
    "avx2": (["-mavx2", "-mfma"], ("avx2", "fma")),
}
ISA_CHOICES = (*BUILDS, "none")
K_MULTIPLE = {"avx512_vnni": 64, "avx2": 32}  # a GEMV's inputs come in registers of this many int8
MAX_ROWS = 4  # sequences one step decodes (cpu_decode.cpp's kMaxRows: its accumulators live in registers)
_build_seconds = [0.0]
# The activation modules transformers uses, by class name -> the C++ step's code.
ACTIVATIONS = {"SiLUActivation": 0, "SiLU": 0, "GELUTanh": 1, "PytorchGELUTanh": 1, "NewGELUActivation": 1}


def requested_isa() -> str | None:
    """The cap set with HETERO_LLM_CPU_ISA, or None (no cap). Unknown values are a typed error."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ISA_CHOICES:
        raise InvalidOptionError(f"{ISA_ENV}={value!r} is not one of {', '.join(ISA_CHOICES)}; unset it to let "
                                 "hetero_llm use the best instruction set this CPU has.")
    return value


def best_isa(isa=None) -> str | None:
    """The build for a CPU with instruction sets `isa` (hardware.CPUInfo.isa; default: this machine's):
    the best it has at or below the cap; None if none can run."""
    if os.environ.get("HETERO_LLM_NO_CPP_KERNELS", "") not in ("", "0"):
        return None
    cap = requested_isa()
    if cap == "none":
        return None
    flags = set(inspect_hardware().cpu.isa if isa is None else isa)
    names = list(BUILDS)
    allowed = names[names.index(cap):] if cap else names
    return next((isa for isa in allowed if all(f in flags for f in BUILDS[isa][1])), None)


def possible() -> bool:
    """Cheap (nothing compiled): a build suits this CPU and a compiler and ninja are there."""
    if best_isa() is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return False
    try:
        import ninja  # noqa: F401  (torch's extension builder runs it)
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _module(isa: str):
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    log.info("hetero_llm: building the %s decode step (once per machine; cached by torch)", isa)
    # torch rebuilds when a listed source changes, not when a header does: the name carries both.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in (SOURCE, HEADER))).hexdigest()[:10]
    name = f"hetero_llm_cpu_decode_{isa}_{digest}"
    clear_stale_lock(name)
    module = load(name=name, sources=[str(SOURCE)],
                  extra_cflags=["-O3", "-fopenmp", *BUILDS[isa][0]], extra_ldflags=["-fopenmp"], verbose=False)
    _build_seconds[0] += time.perf_counter() - start
    return module if _self_test(module) else None


def native_module():
    """The compiled module for this CPU, or None (not possible here, failed build or self-test)."""
    if not possible():
        return None
    try:
        return _module(best_isa())
    except Exception as exc:  # noqa: BLE001 - no compiler, failed build: transformers' loop decodes
        log.warning("hetero_llm: the native CPU decode step is unavailable (%s)", exc)
        return None


def build_seconds() -> float:
    """Seconds this process spent building or loading the module (0 before the first use)."""
    return _build_seconds[0]


def _self_test(module) -> bool:
    """The GEMV against an fp64 product: a build that computes wrong is never used."""
    g = torch.Generator().manual_seed(0)
    k = 2 * int(module.K_MULTIPLE)
    x = torch.randn(3, k, generator=g)
    w = torch.randint(-127, 128, (40, k), generator=g, dtype=torch.int8)
    s = torch.rand(40, generator=g) + 0.5
    b = torch.randn(40, generator=g)
    got = module.int8_gemv(x, w, s, w.sum(1, dtype=torch.int32), b)
    want = (x.double() @ (w.double() * s.double()[:, None]).T + b.double()).float()
    return bool((got - want).abs().max() <= 1e-3 * want.abs().max())


def activation_code(act: nn.Module) -> int | None:
    """The step's code for a model's MLP activation: 0 SiLU, 1 tanh-GELU; None for any other."""
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return 1 if act.approximate == "tanh" else None
    return ACTIVATIONS.get(name)
