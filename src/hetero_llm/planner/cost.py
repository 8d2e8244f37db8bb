"""A first cost model: weight bytes and FLOPs per token against a device roofline.

Decode of one token reads every weight once, so a matmul costs
max(bytes / bandwidth, flops / peak) plus a fixed per-call overhead (eager
dispatch, thread wake-up); blocks add the overhead of their small ops
(rotary, attention, residual adds). The constants are from measurements on a
2-core AVX-512 CPU (SmolLM2-135M) and are replaced by per-machine
micro-benchmarks in the planner's later work.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..hardware import Hardware
from .profile import ModuleProfile

# Fraction of the device's memory bandwidth each matmul kernel reaches when it
# streams weights at batch 1 (measured: fp32 GEMV ~16 GB/s and torch's int8
# GEMV ~30 GB/s where a plain read reaches ~50 GB/s on 2 cores).
# torch._int_mm (W8A8) reads ~33 GB/s at one row; it also quantizes the activations.
# hetero_llm's VNNI GEMV (kernels/cpu_vnni.py) measured 40-64 GB/s.
KERNEL_EFFICIENCY = {"torch": 0.55, "cpu-int8pack": 1.0, "cpu-vnni": 1.7, "torch-dequant": 0.25, "cpu-intmm": 1.1,
                     "torch-w8a8": 0.05}
# Extra small ops per call: W8A8 quantizes its input per token and rescales its output.
KERNEL_EXTRA_US = {"cpu-intmm": 8.0, "torch-w8a8": 30.0}
# Eager per-call overhead of one module's ops, microseconds.
CALL_OVERHEAD_US = {"cpu": 10.0, "cuda": 8.0}
# Small ops of one decoder block outside its matmuls, norms and attention.
BLOCK_OVERHEAD_US = {"cpu": 70.0, "cuda": 60.0}
# Attention's own small ops (rotary, cache update, SDPA) for one decoded token:
# transformers' forward vs RotaryAttention (measured ~1 ms/token saved on 30 layers).
# On a GPU, "triton" is the flash / split-KV kernel pair with rotary in the same module.
ATTENTION_US = {"sdpa": 60.0, "rotary": 25.0, "triton": 20.0}
# One token of generate() bookkeeping (logits processing, cache, stopping checks).
STEP_OVERHEAD_US = {"cpu": 800.0, "cuda": 400.0}
# transformers' RMSNorm runs ~7 small ops; torch's rms_norm is one.
NORM_US = {"torch": 17.0, "torch-rms_norm": 8.0, "torch-layer_norm": 8.0, "triton-rms_norm": 6.0,
           "triton-add_rms_norm": 6.0}
# One elementwise add over the hidden states (a residual), saved when a kernel fuses it.
ADD_US = {"cpu": 6.0, "cuda": 4.0}


@dataclass(frozen=True)
class Roofline:
    device: str
    bandwidth_gbs: float
    gflops: float

    def stream_us(self, nbytes: float, flops: float, efficiency: float = 1.0) -> float:
        """Roofline time: the slower of reading the bytes and doing the math."""
        t_mem = nbytes / (self.bandwidth_gbs * efficiency * 1e3)
        t_math = flops / (self.gflops * 1e3)
        return max(t_mem, t_math)


def roofline(hardware: Hardware, device: str) -> Roofline:
    if device == "cuda" and hardware.gpus:
        g = hardware.gpus[0]
        return Roofline("cuda", g.memory_bandwidth_gbs, g.peak_tflops_bf16 * 1e3)
    return Roofline("cpu", hardware.cpu.memory_bandwidth_gbs, hardware.cpu.peak_gflops_fp32)


def linear_us(p: ModuleProfile, roof: Roofline, kernel: str, bytes_per_weight: float) -> float:
    """Predicted time of one linear for one decoded token."""
    nbytes = p.in_features * p.out_features * bytes_per_weight
    eff = KERNEL_EFFICIENCY.get(kernel, 0.5)
    return (roof.stream_us(nbytes, p.decode_flops(), eff) + CALL_OVERHEAD_US[roof.device]
            + KERNEL_EXTRA_US.get(kernel, 0.0))


def norm_us(kernel: str, roof: Roofline) -> float:
    scale = 1.0 if roof.device == "cpu" else 0.5
    return NORM_US.get(kernel, NORM_US["torch"]) * scale


def attention_us(kind: str, roof: Roofline) -> float:
    return ATTENTION_US[kind] * (1.0 if roof.device == "cpu" else 0.5)


def add_us(roof: Roofline) -> float:
    return ADD_US[roof.device]


def fixed_overhead_us(n_blocks: int, roof: Roofline) -> float:
    """Per-token cost that no module decision changes."""
    return n_blocks * BLOCK_OVERHEAD_US[roof.device] + STEP_OVERHEAD_US[roof.device]
