"""How an INT8 weight-only linear computes a prompt (many rows) on the CPU: chosen by measurement.

Decode (a few rows) reads the weight once and is memory-bound; a prompt is compute-bound, and
which GEMM is fastest depends on what the CPU computes natively:

- ``int8x2``: each activation row split into two int8 levels, x ~= s1*q1 + s2*q2 with s2 = s1/254
  (~15-bit precision, as in the VNNI GEMV of kernels/cpu_vnni.py), and both levels multiplied
  with the int8 weight by ``torch._int_mm`` (oneDNN, VNNI): integer products, no calibration,
  ~1e-4 of the output's range instead of bf16's ~1e-2. Needs an exact ``_int_mm`` (VNNI; on
  AVX2 oneDNN's u8*s8 pairs saturate, so it is refused there by ``int_mm_available``).
- ``bf16``: the weight dequantized to bf16, a bf16 GEMM. Fast with AVX-512 BF16 or AMX; on a
  CPU without them oneDNN emulates bf16: 2.3-3.4x slower than fp32 (Zen 4 with oneDNN capped
  to AVX512_CORE_VNNI, as on an Ice Lake server).
- ``fp32``: the weight dequantized to fp32, an fp32 GEMM: the original model's own speed less
  the conversion.

The three are timed once per machine, each with the residual add and the SiLU gate that follow
it in a decoder layer (int8x2 fuses them), on a 128-token prompt through a weight that fits the
last-level cache and through one that does not (which wins differs: a bf16 copy of a large
weight spills the cache), interleaved, the fastest round of each kept so a busy core slows
every candidate alike; a more accurate one is kept if it is at most 10% slower. Each layer
uses the winner for the nearer size; the choice is cached under ``$HETERO_LLM_CACHE/machine/``
(timed again by the next process when other processes kept our cores busy meanwhile).
``HETERO_LLM_CPU_PREFILL=int8x2|bf16|fp32`` forces one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import threading
import time

import torch
import torch.nn.functional as F

from .._cpu_load import BUSY_CORES, OtherLoad
from .._files import cache_dir, write_text_atomically
from .._version import __version__

STRATEGIES = ("int8x2", "bf16", "fp32")
ENV = "HETERO_LLM_CPU_PREFILL"
NATIVE_ENV = "HETERO_LLM_PREFILL_NATIVE"  # 0: torch ops for the two-level split (tests compare both)
# The GEMMs the strategies are timed on: (rows, in, out) of a 128-token prompt through a weight
# that stays in cache (1M parameters) and one that does not (16M: a 1B model's MLP).
TIMING_SHAPES = {"small": (128, 1024, 1024), "large": (128, 2048, 8192)}
# Layers up to this many parameters (the geometric mean of the two) use the small shape's winner.
SMALL_MAX_PARAMS = 4 * 2**20
TIMING_ROUNDS = 5
LEVEL_RATIO = 254.0  # s2 = s1 / 254: the second level covers the first one's rounding step
CHOICE_VERSION = 4  # bumped when a strategy's code changes, so cached choices are measured again


def split_two_levels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, s1, q1, q2) for fp32 rows `x` (M, K): q (2M, K) int8 stacks the two levels q1 over q2
    (returned too, as floats), s1 (M, 1) is the first level's scale; x ~= s1 * (q1 + q2 / 254).

    Few passes over x, none that is not needed: this runs before every prompt matmul."""
    m = x.shape[0]
    amax = x.abs().amax(dim=1, keepdim=True)  # (torch.aminmax measured 3x slower here)
    s1 = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q1 = torch.mul(x, 1.0 / s1).round_()  # |x / s1| <= 127 by construction: no clamp
    rest = torch.addcmul(x, q1, s1, value=-1.0)  # |rest| <= s1 / 2, so |q2| <= 127
    q2 = rest.mul_(LEVEL_RATIO / s1).round_()
    q = torch.empty(2 * m, x.shape[1], dtype=torch.int8)
    q[:m] = q1
    q[m:] = q2
    return q, s1, q1, q2


def int8x2_matmul(x2d: torch.Tensor, layer) -> torch.Tensor:
    """fp32 (M, N) = x (M, K) . (q (N, K) * scale - zero_point * scale)^T through torch._int_mm.

    The split and the combination run in hetero_llm's compiled helpers where the VNNI kernel is
    built (one pass each; in torch they cost as much as half the integer GEMM on SmolLM2)."""
    m = x2d.shape[0]
    native = _native()
    if native is not None and layer.zero_point is None:  # the helpers take no zero points
        acc, s1 = _levels_product(native, x2d, layer)
        return native.combine_levels(acc, s1, layer.scale)
    q, s1, q1, q2 = split_two_levels(x2d.float())
    acc = torch._int_mm(q, layer.qweight.t())  # (2M, N) int32; the transposed view is read in place
    y = acc[:m].to(torch.float32).add_(acc[m:], alpha=1.0 / LEVEL_RATIO).mul_(s1).mul_(layer.scale)
    if layer.zero_point is not None:
        # sum_k x_k (q_nk - z_n) s_n = (x q^T)_n s_n - (sum_k x_k) z_n s_n, with the x the GEMM saw
        x_sum = (q1.sum(dim=1, keepdim=True) + q2.sum(dim=1, keepdim=True) / LEVEL_RATIO) * s1
        y.sub_(x_sum * layer.zero_scale)
    return y


EPILOGUES = ("add", "silu_glu")


def fused_prefill_matmul(x2d: torch.Tensor, layer, epilogue: str,
                         addend: torch.Tensor | None = None) -> torch.Tensor | None:
    """The prompt GEMM of `layer` with what follows it in a decoder layer done in the same pass
    over its output: "add" returns x W^T + addend (M, N), "silu_glu" silu(g) * u for the output's
    two halves [g | u] (M, N / 2). Only the two-level int8 GEMM has such a pass (its int32 result
    is recombined anyway); None where this layer uses another GEMM, has zero points, or the
    compiled helpers are not built: the caller then runs the separate ops."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue {epilogue!r}: one of {EPILOGUES}")
    if layer.zero_point is not None or strategy(layer.qweight.numel()) != "int8x2":
        return None
    native = _native()
    if native is None:
        return None
    acc, s1 = _levels_product(native, x2d, layer)
    if epilogue == "add":
        return native.combine_levels_add(acc, s1, layer.scale, addend)
    return native.combine_levels_silu_glu(acc, s1, layer.scale)


def _levels_product(native, x2d: torch.Tensor, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(acc (2M, N) int32, s1 (M, 1)): both int8 levels of x times the int8 weight, through the
    compiled split and torch._int_mm; the compiled combine_levels* turn them into the output."""
    q, s1 = native.split_levels(x2d)
    return torch._int_mm(q, layer.qweight.t()), s1


def _native():
    """The compiled helpers (kernels/cpu_vnni.py), or None where they are not built."""
    if os.environ.get(NATIVE_ENV, "") not in ("", "1"):
        return None
    from ..kernels.cpu_vnni import vnni_kernel, vnni_possible
    return vnni_kernel() if vnni_possible() else None


def bf16_matmul(x2d: torch.Tensor, layer) -> torch.Tensor:
    xb = x2d.to(torch.bfloat16)
    y = F.linear(xb, layer.qweight.to(torch.bfloat16)) * layer.scale  # bf16 x fp32 promotes to fp32
    if layer.zero_point is not None:
        # Sum the same bf16 activations the GEMM saw, so the two terms cancel.
        y = y - xb.float().sum(dim=1, keepdim=True) * layer.zero_scale
    return y


def fp32_matmul(x2d: torch.Tensor, layer) -> torch.Tensor:
    xf = x2d.float()
    y = F.linear(xf, layer.qweight.float()).mul_(layer.scale)
    if layer.zero_point is not None:
        y.sub_(xf.sum(dim=1, keepdim=True) * layer.zero_scale)
    return y


MATMULS = {"int8x2": int8x2_matmul, "bf16": bf16_matmul, "fp32": fp32_matmul}


def available() -> tuple[str, ...]:
    """The strategies this build runs correctly on this CPU."""
    from ..kernels.cpu_int_mm import int_mm_available
    return tuple(s for s in STRATEGIES if s != "int8x2" or int_mm_available())


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags")), "")
    return f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def _cache_path():
    # Everything that changes the timings: the CPU, torch, threads, and the ISA caps a user set.
    key = json.dumps([_cpu_name(), torch.__version__, torch.get_num_threads(), __version__, CHOICE_VERSION,
                      _native() is not None, os.environ.get("ATEN_CPU_CAPABILITY", ""),
                      os.environ.get("ONEDNN_MAX_CPU_ISA", "")])
    return cache_dir() / "machine" / f"cpu-prefill-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


class _Layer:
    """The attributes the matmuls read, for a random weight of the timing shape."""

    def __init__(self, n: int, k: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.qweight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        self.scale = torch.rand(n, generator=g) * 1e-2 + 1e-3
        self.zero_point = self.zero_scale = None


def measure(shape: tuple[int, int, int], strategies: tuple[str, ...] | None = None) -> dict[str, float]:
    """Milliseconds per strategy for two (rows, in, out) GEMMs with what follows each in a layer
    (a residual add; silu(gate) * up): the fastest of interleaved rounds.

    The epilogues are part of the cost because only int8x2 fuses them into its recombination
    pass: timed alone, bf16 won the small shape on AMD Zen 4 by 5-12% and then ran SmolLM2's
    bf16 prompt 10% slower than int8x2 did (separate fp32 SiLU and adds over its output)."""
    strategies = strategies or available()
    m, k, n = shape
    layer = _Layer(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    residual = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    best = dict.fromkeys(strategies, float("inf"))

    def step(s):
        _with_epilogue(s, x, layer, "add", residual)
        _with_epilogue(s, x, layer, "silu_glu")

    with torch.inference_mode():
        for s in strategies:
            step(s)  # warm-up: oneDNN builds its kernels on the first call
        for _ in range(TIMING_ROUNDS):
            for s in strategies:
                start = time.perf_counter()
                step(s)
                best[s] = min(best[s], (time.perf_counter() - start) * 1e3)
    return {s: round(t, 3) for s, t in best.items()}


def _with_epilogue(s: str, x2d: torch.Tensor, layer, epilogue: str, addend: torch.Tensor | None = None):
    """The prompt GEMM of strategy `s` and its epilogue, as fused_prefill_matmul and the callers'
    separate ops run them."""
    native = _native()
    if s == "int8x2" and native is not None:
        acc, s1 = _levels_product(native, x2d, layer)
        if epilogue == "add":
            return native.combine_levels_add(acc, s1, layer.scale, addend)
        return native.combine_levels_silu_glu(acc, s1, layer.scale)
    y = MATMULS[s](x2d, layer)
    if epilogue == "add":
        return y.add_(addend)
    gate, up = y.chunk(2, dim=1)
    return F.silu(gate).mul_(up)


# From the most accurate to the least: fp32 rounds only the sums, int8x2 the activations to ~15
# bits, bf16 to 8. A more accurate strategy is kept when it is at most this much slower.
BY_ACCURACY = ("fp32", "int8x2", "bf16")
ACCURACY_MARGIN = 1.10


def pick(timings: dict[str, float]) -> str:
    """The most accurate strategy within ACCURACY_MARGIN of the fastest."""
    fastest = min(timings.values())
    return next(s for s in BY_ACCURACY if s in timings and timings[s] <= ACCURACY_MARGIN * fastest)


_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def chosen() -> dict[str, str]:
    """{"small": strategy, "large": strategy}: measured once per machine, then read from the cache."""
    path = _cache_path()
    try:
        data = json.loads(path.read_text())
        saved = data["strategy"]
        busy = (data.get("others_cores") or 0.0) >= BUSY_CORES  # timed busy: timed again (~1 s)
        if not busy and set(saved) == set(TIMING_SHAPES) and all(v in available() for v in saved.values()):
            return saved
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return remeasure()[0]


def remeasure() -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """(choice, milliseconds per size and strategy), measured now and cached for later processes
    (`hetero-llm inspect --measure`; this process keeps what its layers already use)."""
    path = _cache_path()
    with OtherLoad() as load:
        timings = {size: measure(shape) for size, shape in TIMING_SHAPES.items()}
    picked = {size: pick(t) for size, t in timings.items()}
    try:
        write_text_atomically(path, json.dumps({"strategy": picked, "ms": timings, "shapes": TIMING_SHAPES,
                                                "others_cores": load.cores}))
    except OSError:
        pass  # a read-only home: measured again next process
    return picked, timings


def strategy(params: int = SMALL_MAX_PARAMS) -> str:
    """The prompt GEMM used for an INT8 weight-only linear of `params` weights on this CPU."""
    forced = os.environ.get(ENV, "")
    if forced:
        from ..errors import InvalidOptionError
        if forced not in STRATEGIES:
            raise InvalidOptionError(f"{ENV}={forced!r}: use one of {', '.join(STRATEGIES)}, or unset it")
        if forced not in available():
            raise InvalidOptionError(f"{ENV}={forced}: torch._int_mm is not exact on this CPU (it needs "
                                     f"AVX-512 VNNI or AMX); use bf16 or fp32, or unset it")
        return forced
    with _LOCK:  # concurrent first prompts measure once
        picked = chosen()
    return picked["small" if params <= SMALL_MAX_PARAMS else "large"]


def prefill_matmul(x2d: torch.Tensor, layer) -> torch.Tensor:
    """fp32 output of an INT8 weight-only linear (symmetric or with zero points) on many rows."""
    return MATMULS[strategy(layer.qweight.numel())](x2d, layer)
