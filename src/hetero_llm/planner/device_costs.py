"""What one device costs, as the cost model reads it: pure data, measured (hetero_llm/measure.py)
or tabled (planner/cost.py), cached as JSON. The planner is handed these; it never measures."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

COSTS_VERSION = 3  # 2: INT8 prefill GEMM chosen per CPU (quant/cpu_prefill.py); 3: fast end, probe, load
# Streaming is timed at two sizes: kernels that dequantize into temporaries slow down once those
# leave the cache, so bandwidth is interpolated in log(parameters) between the two.
MEDIUM_SHAPE = (1024, 1024)
LARGE_SHAPE = (2048, 4096)
# GEMM throughput is timed on prompts of these many rows: a CPU GEMM of 512 rows ran 10-25%
# faster per FLOP than one of 128 here, so a 512-token prompt predicted from 128 came out slow.
PROMPT_ROWS = (128, 512)


@dataclass(frozen=True)
class LinearCost:
    """One linear kernel at batch 1: `call_us + bytes / bandwidth` microseconds, the bandwidth
    measured on a medium (1M-parameter) and a large (8M) weight and interpolated between them."""

    call_us: float
    gbs: float  # streaming a medium weight
    gbs_large: float  # streaming a large weight
    gemm_gflops: float  # throughput on a prompt of PROMPT_ROWS[0] rows, for prefill
    gemm_gflops_long: float = 0.0  # ... and of PROMPT_ROWS[1] (0: not measured, the same)

    def throughput(self, rows: int) -> float:
        """GEMM GFLOP/s on `rows` rows, interpolated in log(rows) between the measured two."""
        if self.gemm_gflops_long <= 0:
            return self.gemm_gflops
        lo, hi = PROMPT_ROWS
        t = min(max((math.log(max(rows, 1)) - math.log(lo)) / (math.log(hi) - math.log(lo)), 0.0), 1.0)
        return self.gemm_gflops * (self.gemm_gflops_long / self.gemm_gflops) ** t

    def bandwidth(self, params: float) -> float:
        lo, hi = MEDIUM_SHAPE[0] * MEDIUM_SHAPE[1], LARGE_SHAPE[0] * LARGE_SHAPE[1]
        t = min(max((math.log(max(params, 1)) - math.log(lo)) / (math.log(hi) - math.log(lo)), 0.0), 1.0)
        return self.gbs * (self.gbs_large / self.gbs) ** t  # geometric interpolation

    def decode_us(self, nbytes: float, params: float) -> float:
        return self.call_us + nbytes / (self.bandwidth(params) * 1e3)


@dataclass(frozen=True)
class DeviceCosts:
    """The measured (or tabled) costs of one device, all in microseconds and GB/s."""

    device: str
    source: str  # "measured" | "table"
    read_gbs: float  # plain memory read
    op_us: float  # one small eager op
    linears: dict[str, LinearCost] = field(default_factory=dict)  # "kernel:quant" -> cost
    step_us: dict[str, float] = field(default_factory=dict)  # generate() per step, by block style
    block_us: dict[str, float] = field(default_factory=dict)  # non-matmul work per block, by style
    norm_us: dict[str, float] = field(default_factory=dict)  # one norm call, by kernel
    transfer_gbs: float = 0.0  # host <-> device copies (GPUs), pinned memory
    transfer_us: float = 0.0  # latency of one host <-> device copy
    attention_gflops: float = 0.0  # causal SDPA over a prompt (0: not measured; GEMM throughput)
    probe_us: float = 0.0  # the reference workload (probe_us()) when these were measured
    others_cores: float | None = None  # cores other processes used meanwhile (None: unknown)
    version: int = COSTS_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceCosts":
        d = dict(d)
        d["linears"] = {k: LinearCost(**v) for k, v in d.get("linears", {}).items()}
        return cls(**d)
