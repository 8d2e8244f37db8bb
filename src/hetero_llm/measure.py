"""Micro-benchmarks that give the cost model this machine's numbers, measured once and cached.

Each linear kernel is timed at batch 1 on a small weight (its fixed cost per call) and on a
pool of weights larger than the last-level cache (its streaming bandwidth), so a decode
step's linear costs `call_us + bytes / bandwidth`. A tiny Llama decoded with 1 and 5 layers
gives the per-step cost of generate() and the per-block cost of everything that is not a
matmul (norms, rotary, attention over the cache, residual adds, Python between them), for
transformers' own blocks and for hetero_llm's fused ones. GEMM throughput (prefill) and plain
memory-read bandwidth complete the roofline.

Results go to `$HETERO_LLM_CACHE/machine/<key>.json` (default ~/.cache/hetero_llm), keyed by
CPU, thread count, torch and hetero_llm versions; measuring takes ~30 s once.
`HETERO_LLM_MEASURE=0` skips measuring and uses table values instead.

A busy machine must not leave wrong figures behind. Every timing keeps the fast end of many
short batches (a busy core slows batches, never speeds them); the CPU time other processes took on our cores
while measuring is recorded (`_cpu_load.OtherLoad`), with a short reference workload's time
(`probe_us`). The first time a process reads the cache, it runs the reference again: when the
machine is quiet now and the figures were taken busy, or the reference runs more than
`PROBE_DRIFT` faster than it did then, everything is measured again (a machine that runs
slower while nothing of ours is busy keeps its figures: they describe it at its best).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ._cpu_load import BUSY_CORES, OtherLoad
from ._files import cache_dir, write_text_atomically
from ._version import __version__
from .hardware import Hardware
from .planner.device_costs import (COSTS_VERSION, LARGE_SHAPE, MEDIUM_SHAPE, PROMPT_ROWS, DeviceCosts,
                                   LinearCost)

# Weights cycled through to time streaming: 8x a 32 MiB last-level cache. With 2x, calls still
# hit it (AMD's L3 keeps victims): 40 GB/s measured where a 1B model's decode streams at 30.
STREAM_POOL_BYTES = 256 * 2**20
SLOW_STREAM_GBS = 4.0
READ_BYTES = 512 * 2**20  # plain read bandwidth: summing this much
SMALL_SHAPE = (256, 256)  # (out, in): in cache, so its time is the kernel's fixed cost per call
TINY_LAYERS = (2, 10)
TINY_NEW_TOKENS = 32
# The cached figures are measured again when the reference workload runs faster by more than
# this factor than when they were taken (run-to-run drift on a shared VM is ~15%).
PROBE_DRIFT = 1.3


# ----------------------------------------------------------------------------- timing


def time_us(fn: Callable[[], object], min_s: float = 0.002, budget_s: float = 0.08, min_repeats: int = 5) -> float:
    """Microseconds per call at the fast end (FAST_QUANTILE) of many short batches (each at least
    `min_s`, as many as fit in `budget_s`, at least `min_repeats`). Other processes only ever
    slow a batch down, and a short batch often runs whole while a busy neighbour is descheduled:
    with a process spinning on one of 2 cores, the fastest 20 ms batch of an op ran 1.7-2x slow,
    2 ms ones 1.0-1.15x."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    n = max(1, int(min_s / once))
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_repeats or spent < budget_s:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed / n)
        spent += elapsed
    return _fast_end(samples) * 1e6


# Timings keep this quantile of their samples: the fast end, which a busy neighbour does not
# reach, without the rare lucky batch the minimum would be (quiet, the minimum ran ~9% under
# the median when streaming weights; this quantile a few percent).
FAST_QUANTILE = 0.2


def _fast_end(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[int(FAST_QUANTILE * (len(ordered) - 1))]


# ----------------------------------------------------------------------------- linears


def _linear_variants() -> dict[str, Callable[[torch.Tensor], nn.Module]]:
    """"kernel:quant" -> builder of that module from an fp32 (out, in) weight, for kernels this
    machine can run. Mirrors what quantize_pass builds."""
    from .kernels.cpu_vnni import vnni_possible
    from .quant.backends import BACKENDS
    from .quant.modules import Int8Linear
    from .quant.w8a8 import BACKENDS as W8A8_BACKENDS
    from .quant.w8a8 import W8A8Linear

    def linear(dtype):
        def build(w):
            m = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
            m.weight.data.copy_(w)
            return m
        return build

    def int8(backend, scheme):
        return lambda w: Int8Linear.from_linear(linear(torch.float32)(w), scheme, backend=backend)

    def w8a8(backend):
        return lambda w: W8A8Linear.from_weight(w, None, smooth=torch.ones(w.shape[1]), backend=backend)

    cpu, k = torch.device("cpu"), LARGE_SHAPE[1]
    out = {"torch:float32": linear(torch.float32), "torch:bfloat16": linear(torch.bfloat16),
           "torch-dequant:int8": int8("torch-dequant", "int8"),
           "torch-dequant:int8-asym": int8("torch-dequant", "int8-asym"),
           "torch-dequant:int8:g128": int8("torch-dequant", "int8:g128"),
           "torch-w8a8:w8a8": w8a8("torch-w8a8")}
    if BACKENDS["cpu-int8pack"].supports(k, cpu, None):
        out["cpu-int8pack:int8"] = int8("cpu-int8pack", "int8")
        out["cpu-int8pack:int8-asym"] = int8("cpu-int8pack", "int8-asym")
        if vnni_possible():
            out["cpu-vnni:int8"] = int8("cpu-vnni", "int8")
    if W8A8_BACKENDS["cpu-intmm"].supports(k, cpu):
        out["cpu-intmm:w8a8"] = w8a8("cpu-intmm")
    return out


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())
               if t.dim() == 2)


def _stream_gbs(build: Callable[[torch.Tensor], nn.Module], shape: tuple[int, int], slow: bool,
                call_us: float, device: torch.device, dtype: torch.dtype) -> tuple[float, nn.Module]:
    """GB/s of batch-1 calls cycling through weights that together exceed the cache."""
    gen = torch.Generator().manual_seed(1)
    first = build(torch.randn(*shape, generator=gen) * 0.05).to(device)
    per = _weight_bytes(first)
    x = torch.randn(1, shape[1], dtype=dtype, device=device)
    with torch.inference_mode():
        once = time_us(lambda: first(x), min_repeats=3, budget_s=0.0)
    # Fast kernels stream a pool of STREAM_POOL_BYTES; ones slower than SLOW_STREAM_GBS (which
    # dequantize into temporaries) a quarter of it, so timing them stays short. A reference
    # kernel that computes in fp64 is too slow to stream a pool at all.
    pool_bytes = STREAM_POOL_BYTES if per / once / 1e3 >= SLOW_STREAM_GBS else STREAM_POOL_BYTES // 4
    count = 2 if slow else max(2, -(-pool_bytes // per))
    # Copies of one weight: the same speed as distinct random ones, at the cost of a memcpy.
    pool = [first] + [copy.deepcopy(first) for _ in range(count - 1)]

    def stream():
        for m in pool:
            m(x)
    with torch.inference_mode():
        per_call = time_us(_synced(stream, device), budget_s=0.1, min_repeats=3) / count
    return per / max(per_call - call_us, 0.05) / 1e3, first


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


def _measure_linear(build: Callable[[torch.Tensor], nn.Module], slow: bool,
                    device: torch.device = torch.device("cpu")) -> LinearCost:
    small = build(torch.randn(*SMALL_SHAPE, generator=torch.Generator().manual_seed(0)) * 0.05).to(device)
    dtype = small.weight.dtype if isinstance(small, nn.Linear) else torch.float32
    if device.type == "cuda" and dtype == torch.float32:
        dtype = torch.bfloat16
    x_small = torch.randn(1, SMALL_SHAPE[1], dtype=dtype, device=device)
    with torch.inference_mode():
        call = time_us(_synced(lambda: small(x_small), device))
    gbs, _ = _stream_gbs(build, MEDIUM_SHAPE, slow, call, device, dtype)
    gbs_large, big = _stream_gbs(build, LARGE_SHAPE, slow, call, device, dtype)
    gflops = []
    for rows in PROMPT_ROWS:
        xs = torch.randn(rows, LARGE_SHAPE[1], dtype=dtype, device=device)
        with torch.inference_mode():
            gemm = time_us(_synced(lambda: big(xs), device), budget_s=0.15, min_repeats=3)
        gflops.append(round(2 * rows * LARGE_SHAPE[0] * LARGE_SHAPE[1] / gemm / 1e3, 3))
    return LinearCost(round(call, 3), round(gbs, 3), round(gbs_large, 3), *gflops)


# ----------------------------------------------------------------------------- whole blocks


def _tiny_llama(layers: int) -> nn.Module:
    """A Llama small enough that its matmuls cost only their call overhead."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # Attention shaped like a small real model (hidden 576, 9 heads, 3 KV heads): with 256 hidden
    # and fp32 matmuls the per-block cost measured twice what real blocks cost.
    cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


class _TokenClock:
    """A generate() streamer that notes when each new token arrives (the first put() is the
    prompt). Streamers run in transformers' loop and in hetero_llm's own greedy loop alike."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_us(model: nn.Module) -> tuple[float, list[float]]:
    """One greedy generate() of TINY_NEW_TOKENS after a 16-token prompt, in microseconds: the
    first token (setting up, the prompt, the first step) and each later token's step."""
    ids = torch.arange(1, 17, device=model.device).reshape(1, -1)
    clock = _TokenClock()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=TINY_NEW_TOKENS, min_new_tokens=TINY_NEW_TOKENS, do_sample=False,
                       pad_token_id=0, attention_mask=torch.ones_like(ids), streamer=clock)
    marks = [clock.start] + clock.times[1:]  # times[0]: the prompt, put before any work
    return (marks[1] - marks[0]) * 1e6, [(b - a) * 1e6 for a, b in zip(marks[1:], marks[2:])]


def _token_us(runs: list[tuple[float, list[float]]]) -> float:
    """Microseconds per token of a TINY_NEW_TOKENS generate(), as benchmarks count it (the first
    token's set-up and prompt spread over all tokens), from the fast end of several runs: steps
    are short (1-10 ms), so while another process holds a core some still run undisturbed."""
    steps = sorted(step for _, run in runs for step in run)
    first = min(first for first, _ in runs)
    return (first + _fast_end(steps) * (TINY_NEW_TOKENS - 1)) / TINY_NEW_TOKENS


def _block_costs(linears: dict[str, LinearCost], norm_us: dict[str, float],
                 device: torch.device = torch.device("cpu"), linear_key: str = "torch:float32") -> tuple[dict, dict]:
    """Per-step and per-block (non-matmul) costs of transformers' blocks ("sdpa") and
    hetero_llm's fused ones ("rotary"), from tiny Llamas decoded with 2 and 10 layers (runs
    interleaved, a low quantile of their per-token steps). The tiny linears' and norms' own call costs are taken out, since the
    cost model adds them per module."""
    import warnings

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    int8 = next((k for k in ("cpu-vnni:int8", "cpu-int8pack:int8") if k in linears), linear_key)
    quantize = "int8" if int8 != linear_key else "none"
    styles = {"sdpa": (lambda m: m, 7, "torch", linear_key),  # q, k, v, o, gate, up, down; transformers' norm
              # transformers' loop: the native step has costs of its own (cost.native_cpu)
              "rotary": (lambda m: _accelerated(m, quantize=quantize, decode="transformers"),
                         4, "torch-rms_norm", int8)}  # fused qkv, o, fused gate_up, down
    if quantize == "int8" and _native_possible():
        # The compiled step (decode="native"): its linears and norms run inside it, so a block's
        # measured time minus its in-cache GEMVs is all "block" (norm and call costs: NATIVE_*).
        styles["native"] = (lambda m: _accelerated(m, quantize="int8", decode="native"), 0, None, int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {(style, n): prepare(_tiny_llama(n).to(device, dtype))
                  for style, (prepare, _, _, _) in styles.items() for n in TINY_LAYERS}
        for m in models.values():
            _generate_us(m)  # warm-up
        runs: dict = {key: [] for key in models}
        for _ in range(5):
            for key, m in models.items():
                runs[key].append(_generate_us(m))
    step, block = {}, {}
    for style, (_, n_linears, norm, kernel) in styles.items():
        call = linears[kernel].call_us
        block_linears = n_linears * call if norm else _tiny_native_linears_us(linears[kernel])
        norm_call = norm_us[norm] if norm else 0.0
        t_lo, t_hi = (_token_us(runs[(style, n)]) for n in TINY_LAYERS)
        per_block = (t_hi - t_lo) / (TINY_LAYERS[1] - TINY_LAYERS[0])
        block[style] = round(max(per_block - block_linears - 2 * norm_call, 0.0), 3)
        step[style] = round(max(t_lo - TINY_LAYERS[0] * per_block - call - norm_call, 0.0), 3)
    return step, block


def _accelerated(model: nn.Module, **options) -> nn.Module:
    """`model` accelerated with `options`, planned from tables (no measured costs: nothing is
    measured while measuring) and applied as accelerate() applies a plan; the tiny Llamas are
    built here, so accelerate()'s checks of a user's model are moot."""
    from .config import Options
    from .pipeline import apply_plan
    from .planner import make_plan
    return apply_plan(model, make_plan(model, _no_measure_hardware(), Options.from_kwargs(**options), strict=False))


# The tiny Llama's linears per block, (out, in): fused q/k/v, o, fused gate/up, down.
TINY_LINEARS = ((576 + 2 * 192, 576), (576, 576), (2 * 256, 576), (576, 256))


def _tiny_native_linears_us(cost: LinearCost) -> float:
    """What the cost model adds for one tiny block's INT8 GEMVs inside the compiled step, so
    that the block cost measured from it counts them once: its streaming bandwidth applies, and
    the step's per-GEMV cost (cost.NATIVE_CALL_US: the same 2 us, kept here to import nothing
    from above)."""
    return sum(2.0 + out * inp / (cost.bandwidth(out * inp) * 1e3) for out, inp in TINY_LINEARS)


def _native_possible() -> bool:
    """Whether the compiled CPU decode step can be built here (building it, ~30 s once, when
    it is not in torch's extension cache yet: accelerate() would build it next anyway)."""
    from .kernels import cpu_decode
    return cpu_decode.possible() and cpu_decode.native_module() is not None


def _norm_costs() -> dict[str, float]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from .fused.modules import RMSNorm
    x = torch.randn(1, 1, 1024)
    hf = LlamaRMSNorm(1024)
    ours = RMSNorm(hf.weight, 1e-6, backend="torch")
    ln = nn.LayerNorm(1024)
    with torch.inference_mode():
        out = {"torch": time_us(lambda: hf(x)), "torch-layer_norm": time_us(lambda: ln(x)),
               "torch-rms_norm": time_us(lambda: ours(x))}
    return {k: round(v, 3) for k, v in out.items()}


def _attention_gflops() -> float:
    """Causal SDPA over a 512-token prompt (9 query / 3 KV heads of 64, SmolLM2's shape), in
    GFLOP/s of its two matmuls: softmax and masking make it ~3x slower per FLOP than a GEMM."""
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 9, 512, 64, generator=gen)
    k, v = (torch.randn(1, 3, 512, 64, generator=gen) for _ in range(2))
    with torch.inference_mode():
        t = time_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                    budget_s=0.15)
    return round(2.0 * 512 * 512 * 9 * 64 / t / 1e3, 3)  # QK^T and PV over the causal half


def _read_gbs(device: torch.device) -> float:
    """Plain memory-read bandwidth: summing READ_BYTES (16x a 32 MiB last-level cache)."""
    big = torch.ones(READ_BYTES // 4, dtype=torch.float32, device=device)
    with torch.inference_mode():
        return big.numel() * 4 / time_us(_synced(lambda: big.sum(), device), budget_s=0.1, min_repeats=3) / 1e3


def probe_us() -> float:
    """A fixed reference workload on all threads (~0.15 s in all): a 16 MB read and a 128-row
    GEMM, the two things decode and prompts are made of. Compared with the figure stored beside
    the cached costs, it says whether the machine runs as it did when they were measured."""
    data = torch.ones(4 * 2**20)
    a, w = torch.randn(128, 1024), torch.randn(1024, 1024)
    with torch.inference_mode():
        return time_us(lambda: (data.sum(), a @ w), budget_s=0.15, min_repeats=20)


def measure_cpu() -> DeviceCosts:
    """Run the CPU micro-benchmarks (~30 s on 2 cores), noting how busy other processes kept
    our cores meanwhile."""
    with OtherLoad() as load:
        probe = probe_us()
        read_gbs = _read_gbs(torch.device("cpu"))
        small_a, small_b = torch.randn(1, 576), torch.randn(1, 576)
        with torch.inference_mode():
            op_us = time_us(lambda: torch.add(small_a, small_b))
        linears = {}
        for name, build in _linear_variants().items():
            linears[name] = _measure_linear(build, slow=name.startswith("torch-w8a8"))
        norm_us = _norm_costs()
        step_us, block_us = _block_costs(linears, norm_us)
        attention = _attention_gflops()
        probe = min(probe, probe_us())
    if load.busy:
        print(f"hetero_llm: other processes used {load.cores:.1f} cores while this CPU was measured; "
              "the figures are kept for now and measured again once the machine is quiet", file=sys.stderr)
    return DeviceCosts("cpu", "measured", round(read_gbs, 3), round(op_us, 3), linears, step_us, block_us, norm_us,
                       attention_gflops=attention, probe_us=round(probe, 3), others_cores=load.cores)


# ----------------------------------------------------------------------------- cache


def _cache_dir() -> Path:
    return cache_dir() / "machine"


def machine_key(hardware: Hardware) -> str:
    """What the measurements depend on: CPU, threads in use, and the code that ran."""
    c = hardware.cpu
    text = json.dumps([c.model, c.physical_cores, c.logical_cores, list(c.isa), torch.get_num_threads(),
                       torch.__version__, __version__, COSTS_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measured_cpu_costs(hardware: Hardware) -> DeviceCosts | None:
    """What the planner is handed for `hardware`'s CPU: this machine's measured costs when
    `hardware` was inspected here, else None (the planner's tables)."""
    return cached_cpu_costs(hardware) if hardware.source == "inspected" else None


def cached_cpu_costs(hardware: Hardware, *, refresh: bool = False) -> DeviceCosts | None:
    """This machine's measured CPU costs: from the cache, or measured now and cached.

    None when measuring is turned off (HETERO_LLM_MEASURE=0)."""
    if os.environ.get("HETERO_LLM_MEASURE", "1").strip() in ("0", "false", "no"):
        return None
    path = _cache_dir() / f"cpu-{machine_key(hardware)}.json"
    why = "once; cached"
    if path.is_file() and not refresh:
        try:
            cached = DeviceCosts.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            cached = None  # a damaged or older file: measure again
        if cached is not None:
            why = _stale(path, cached)
            if why is None:
                return cached
    print(f"hetero_llm: measuring this CPU for the cost model ({why})...", file=sys.stderr, flush=True)
    costs = measure_cpu()
    write_text_atomically(path, json.dumps(costs.to_dict(), indent=1))
    _CHECKED.add(str(path))
    return costs


_CHECKED: set[str] = set()  # cache files this process has checked against the machine


def _stale(path: Path, cached: DeviceCosts) -> str | None:
    """Why the cached figures should be measured again, or None to keep them. Checked once per
    process and file (~0.15 s): the reference workload is run and compared."""
    if str(path) in _CHECKED:
        return None
    _CHECKED.add(str(path))
    with OtherLoad() as load:
        now = probe_us()
    if load.busy:
        return None  # busy now: measuring now could only be worse than what is cached
    if cached.others_cores is not None and cached.others_cores >= BUSY_CORES:
        return f"the cached figures were taken while other processes used {cached.others_cores:.1f} cores"
    if cached.probe_us > 0 and now * PROBE_DRIFT < cached.probe_us:
        return (f"a reference workload runs {cached.probe_us / now:.2f}x as fast as when the cached figures "
                "were taken")
    # Slower now, yet nothing of ours is busy: a noisy neighbour on the host (seen on shared VMs:
    # 2x for minutes). The cached figures stay: they describe the machine at its best.
    return None


def _no_measure_hardware() -> Hardware:
    """This machine as a hand-built Hardware, planned from tables (the plans of the tiny models
    measured here)."""
    import dataclasses

    from .hardware import inspect_hardware
    return dataclasses.replace(inspect_hardware(), source="manual")
