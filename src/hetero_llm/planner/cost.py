"""The cost model: per-module bytes and FLOPs against a device's measured (or tabled) costs.

A decode step reads every weight once, so a linear costs `call_us + bytes / bandwidth(kernel)`
(bounded below by its FLOPs at the kernel's GEMM throughput when many rows share the step);
a prompt of S tokens costs `max(bytes / bandwidth, FLOPs / throughput)`. Per block, the work
that is not a matmul (norms, rotary, attention over the KV cache, residual adds and the Python
between them) is a measured constant plus the bytes of KV cache it reads. generate() adds a
measured per-step cost. The whole-model prediction is the sum over modules (Amdahl: the parts
a decision does not touch keep their time).

Where the numbers come from (`device_costs`): on the machine you are on, micro-benchmarks run
once and cached (hetero_llm/measure.py), handed to the planner. For other hardware (named profiles, hand-built Hardware),
tables: the CPU table is the reference machine's measurements scaled by memory bandwidth and
peak FLOPs; the GPU table is datasheet bandwidth and FLOPs times typical efficiencies.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..hardware import Hardware
from .device_costs import DeviceCosts, LinearCost
from .profile import ModuleProfile

# Measured on the reference machine (2-core AMD EPYC, AVX-512 VNNI, torch 2.13): CPU table values
# for hardware we are not on are these, scaled by bandwidth and peak ratios (see _cpu_table).
_REF_CPU = dict(read_gbs=42.5, peak_fp32=332.0, peak_int8=1329.0, op_us=1.0)
_REF_LINEARS = {  # kernel:quant -> (call_us, GB/s medium, GB/s large, GEMM GFLOP/s, peak it scales with)
    "torch:float32": (6.4, 18.1, 23.6, 172.0, "fp32"), "torch:bfloat16": (17.6, 27.5, 28.5, 804.0, "bf16"),
    "torch-dequant:int8": (24.4, 7.6, 0.46, 143.0, "fp32"),
    "torch-dequant:int8-asym": (31.9, 6.3, 0.30, 133.0, "fp32"),
    "torch-dequant:int8:g128": (24.3, 8.2, 0.49, 150.0, "fp32"),
    "torch-w8a8:w8a8": (42.4, 7.3, 0.45, 89.0, "fp32"),
    "cpu-int8pack:int8": (11.7, 31.2, 31.7, 662.0, "int8"), "cpu-int8pack:int8-asym": (16.9, 29.7, 30.4, 636.0, "int8"),
    "cpu-vnni:int8": (9.4, 42.3, 51.2, 665.0, "int8"), "cpu-intmm:w8a8": (20.6, 25.9, 34.9, 1004.0, "int8"),
}
_REF_CPU_STEP = {"sdpa": 400.0, "rotary": 300.0}
_REF_CPU_BLOCK = {"sdpa": 200.0, "rotary": 170.0}
_REF_CPU_NORM = {"torch": 11.6, "torch-layer_norm": 4.3, "torch-rms_norm": 9.1}

# GPU tables (no GPU measured yet): fractions of datasheet bandwidth / FLOPs, and the eager
# per-op costs of a host driving the GPU one small kernel at a time.
_GPU_LINEARS = {  # kernel:quant -> (call_us, fraction of bandwidth medium, large, fraction of peak, peak)
    "torch:bfloat16": (8.0, 0.6, 0.85, 0.6, "bf16"), "torch:float16": (8.0, 0.6, 0.85, 0.6, "bf16"),
    "torch:float32": (8.0, 0.6, 0.85, 0.05, "bf16"),
    "triton-int8:int8": (12.0, 0.5, 0.75, 0.5, "bf16"), "triton-int8:int8-asym": (12.0, 0.5, 0.75, 0.5, "bf16"),
    "triton-int8:int8:g128": (12.0, 0.45, 0.7, 0.45, "bf16"), "triton-w8a8:w8a8": (20.0, 0.45, 0.7, 0.5, "int8"),
    "torch-dequant:int8": (30.0, 0.15, 0.25, 0.3, "bf16"), "torch-w8a8:w8a8": (60.0, 0.05, 0.05, 0.01, "bf16"),
}
_GPU_STEP = {"sdpa": 3000.0, "rotary": 2500.0, "triton": 2500.0}
_GPU_BLOCK = {"sdpa": 600.0, "rotary": 350.0, "triton": 250.0}
_GPU_NORM = {"torch": 40.0, "torch-rms_norm": 8.0, "torch-layer_norm": 8.0, "triton-rms_norm": 8.0,
             "triton-add_rms_norm": 8.0}
# Host -> GPU copies: pinned memory on PCIe 5 (Hopper hosts) / PCIe 4, and pageable memory
# (what a plain .to("cuda") of an ordinary CPU tensor gets; accelerate's offload does this).
PINNED_GBS = {9: 40.0, 8: 22.0}
PAGEABLE_FRACTION = 0.5
TRANSFER_US = 15.0  # latency of one small host <-> device copy (one activation crossing)


def _scaled(ref: dict, ratio_bw: float, peaks: dict[str, float], cap_gbs: float) -> dict[str, LinearCost]:
    return {k: LinearCost(call, min(gbs * ratio_bw, cap_gbs), min(large * ratio_bw, cap_gbs), gemm * peaks[peak])
            for k, (call, gbs, large, gemm, peak) in ref.items()}


def _cpu_table(hardware: Hardware) -> DeviceCosts:
    c = hardware.cpu
    bw = c.memory_bandwidth_gbs / 30.0  # the reference machine's own estimate was 30 GB/s
    peaks = {"fp32": c.peak_gflops_fp32 / _REF_CPU["peak_fp32"],
             "bf16": c.peak_gflops_bf16 / (2 * _REF_CPU["peak_fp32"]),
             "int8": c.peak_gops_int8 / _REF_CPU["peak_int8"]}
    return DeviceCosts("cpu", "table", _REF_CPU["read_gbs"] * bw, _REF_CPU["op_us"],
                       _scaled(_REF_LINEARS, bw, peaks, 0.85 * c.memory_bandwidth_gbs), dict(_REF_CPU_STEP), dict(_REF_CPU_BLOCK),
                       dict(_REF_CPU_NORM))


def _gpu_table(hardware: Hardware) -> DeviceCosts:
    g = hardware.gpus[0]
    peaks = {"bf16": g.peak_tflops_bf16 * 1e3, "int8": g.peak_tops_int8 * 1e3}
    linears = {k: LinearCost(call, lo * g.memory_bandwidth_gbs, hi * g.memory_bandwidth_gbs, frac * peaks[peak])
               for k, (call, lo, hi, frac, peak) in _GPU_LINEARS.items()}
    pinned = PINNED_GBS.get(g.compute_capability[0], 22.0 if g.compute_capability[0] < 9 else 40.0)
    return DeviceCosts("cuda", "table", 0.9 * g.memory_bandwidth_gbs, 5.0, linears, dict(_GPU_STEP),
                       dict(_GPU_BLOCK), dict(_GPU_NORM), transfer_gbs=pinned, transfer_us=TRANSFER_US)


# A decode step replayed as one CUDA graph (decode="cuda_graph"): the host launches nothing per
# kernel, so each kernel's fixed cost is the GPU's own gap between graph nodes, and a block's work
# outside matmuls and norms is its ~14 small kernels (rotary, cache update, split-KV attention).
# generate() still runs its loop on the host between replays (inputs, logits processors, the stop
# check that waits for the GPU). Estimates, as the rest of the GPU table, until measured.
GRAPH_KERNEL_US = 2.0
GRAPH_BLOCK_KERNELS = 14
GRAPH_STEP_US = 300.0


def graphed(costs: DeviceCosts) -> DeviceCosts:
    """`costs` for a decode step replayed as a CUDA graph: per-call host costs become graph gaps."""
    linears = {k: replace(c, call_us=GRAPH_KERNEL_US) for k, c in costs.linears.items()}
    return replace(costs, linears=linears, step_us={k: GRAPH_STEP_US for k in costs.step_us},
                   block_us={k: GRAPH_BLOCK_KERNELS * GRAPH_KERNEL_US for k in costs.block_us},
                   norm_us={k: GRAPH_KERNEL_US for k in costs.norm_us}, op_us=GRAPH_KERNEL_US)


# A CPU decode step in one native call (decode="native", kernels/cpu_decode.cpp): a linear's fixed
# cost is one parallel region, a block's work outside matmuls is a few short loops (norms, rotary,
# attention, activation: ~15 us on SmolLM2's widths, plus its KV-cache reads), and the step around
# the layers (embedding, rotary tables, final norm, lm_head's call, hetero_llm's greedy loop) ~0.5 ms.
# Measured on the reference machine (SmolLM2-135M: layers 4.2 ms, lm_head 0.6-0.9 ms, the rest ~0.5 ms).
NATIVE_CALL_US = 2.0
NATIVE_BLOCK_US = 15.0
NATIVE_NORM_US = 1.0
NATIVE_STEP_US = 500.0


def native_cpu(costs: DeviceCosts) -> DeviceCosts:
    """`costs` for a CPU decode step run by the native layer loop: per-op dispatch costs go away.
    A block's and the step's own work are the "native" figures measure.py took on this CPU
    (tiny Llamas decoded by the compiled step), else the reference machine's above."""
    linears = {k: replace(c, call_us=min(c.call_us, NATIVE_CALL_US)) for k, c in costs.linears.items()}
    block = costs.block_us.get("native", NATIVE_BLOCK_US)
    step = costs.step_us.get("native", NATIVE_STEP_US)
    return replace(costs, linears=linears, step_us=dict.fromkeys(costs.step_us, step),
                   block_us=dict.fromkeys(costs.block_us, block),
                   norm_us={k: NATIVE_NORM_US for k in costs.norm_us}, op_us=0.2)


def device_costs(hardware: Hardware, device: str, cpu_costs: DeviceCosts | None = None) -> DeviceCosts:
    """Costs of `device` ("cpu" or "cuda"): the CPU's measured `cpu_costs` when the caller has
    them (measure.py, for this machine), else table values."""
    if device.startswith("cuda"):
        return _gpu_table(hardware)
    return cpu_costs if cpu_costs is not None else _cpu_table(hardware)


@dataclass(frozen=True)
class CostModel:
    """Predicted microseconds of each kind of module on one device."""

    costs: DeviceCosts
    batch: int = 1  # sequences decoded together in one step
    context: int = 512  # tokens already in the KV cache at a typical step

    @property
    def device(self) -> str:
        return self.costs.device

    def linear_cost(self, kernel: str, quant: str | None, dtype: str) -> LinearCost:
        """The measured kernel; an unmeasured variant falls back to its nearest relative."""
        kernel = kernel.split("+", 1)[0]
        linears = self.costs.linears
        key = f"{kernel}:{quant or dtype}"
        for candidate in (key, f"{kernel}:{(quant or '').split(':')[0]}", f"{kernel}:int8",
                          f"torch:{dtype}", "torch:bfloat16", "torch:float32"):
            if candidate in linears:
                return linears[candidate]
        return next(iter(linears.values()))

    def linear_us(self, p: ModuleProfile, kernel: str, quant: str | None, nbytes: float, rows: int = 0) -> float:
        """One decode step (`rows` = batch) or one prompt through a linear."""
        rows = rows or self.batch
        c = self.linear_cost(kernel, quant, p.dtype)
        t_mem = c.decode_us(nbytes, p.in_features * p.out_features)
        t_math = 2.0 * rows * p.in_features * p.out_features / (c.throughput(rows) * 1e3)
        return max(t_mem, t_math + c.call_us)

    def norm_us(self, kernel: str) -> float:
        return self.costs.norm_us.get(kernel, self.costs.norm_us.get("torch", 10.0))

    def block_us(self, style: str, kv_bytes_per_token: float = 0.0) -> float:
        """A block's work outside matmuls and norms, plus reading its KV cache at `context`."""
        fixed = self.costs.block_us.get(style, self.costs.block_us.get("sdpa", 200.0))
        return fixed + self.batch * self.context * kv_bytes_per_token / (self.costs.read_gbs * 1e3)

    def step_us(self, style: str) -> float:
        return self.costs.step_us.get(style, self.costs.step_us.get("sdpa", 500.0))

    def add_us(self) -> float:
        return self.costs.op_us

    def call_us(self, kernel: str, quant: str | None, dtype: str) -> float:
        return self.linear_cost(kernel, quant, dtype).call_us


def transfer_us(costs: DeviceCosts, nbytes: float, pinned: bool = True) -> float:
    """One host <-> GPU copy of `nbytes`."""
    gbs = costs.transfer_gbs * (1.0 if pinned else PAGEABLE_FRACTION)
    return costs.transfer_us + nbytes / (max(gbs, 1e-3) * 1e3)
