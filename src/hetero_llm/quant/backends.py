"""How an INT8 weight-only matmul is computed: strategy objects, one per backend.

The quantized module does not care which one runs; the plan names it. Every
backend is checked against `TorchReference`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .cpu_prefill import prefill_matmul
from .primitives import dequantize

# Batch rows at or below this use the GEMV kernel; above it a GEMM wins (measured on
# AVX-512 CPUs: at 512 rows int8pack is ~3x slower than a bf16 GEMM on the dequantized
# weight). Which GEMM is chosen per CPU by measurement: see cpu_prefill.
GEMV_MAX_ROWS = 16


class TorchReference:
    """Dequantize to the activation dtype and run a plain matmul. Always works."""

    name = "torch-dequant"

    def supports(self, in_features: int, device: torch.device, group_size: int | None = None) -> bool:
        return True

    def matmul(self, x2d: torch.Tensor, layer) -> torch.Tensor:
        # Dequantize in fp32, then cast: scaling after an fp16 matmul on raw
        # integers would overflow (outputs ~127x too large before scaling).
        return F.linear(x2d, dequantize(layer.quantized_weight(), x2d.dtype))


@functools.lru_cache(maxsize=1)
def int8pack_available() -> bool:
    """torch's CPU weight-only INT8 kernel exists and is right on this build."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 64, generator=g)
        q = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
        s = torch.rand(48, generator=g) + 0.5
        got = op(x.to(torch.bfloat16), q, s.to(torch.bfloat16)).float()
        want = x @ (q.float() * s[:, None]).T
        # bf16 activations and output: relative error ~1e-2 at most.
        return bool((got - want).abs().max() <= 2e-2 * want.abs().max())
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


class CpuInt8Pack:
    """CPU: torch's AVX-512/AVX2 int8 GEMV for decode; for prompts, the GEMM this CPU runs
    fastest (cpu_prefill: two-level int8 activations on VNNI, or bf16, or fp32).

    Decode activations enter the GEMV in bf16 (accumulation is fp32 inside); the result is
    scaled in fp32 and returned in the input dtype.
    """

    name = "cpu-int8pack"

    def supports(self, in_features: int, device: torch.device, group_size: int | None = None) -> bool:
        # The kernel reads K in blocks of 16 and returns garbage (or crashes)
        # for other widths, so those layers use the reference path. It takes
        # one scale per output channel: per-group weights use the reference.
        return (device.type == "cpu" and group_size is None and in_features % 16 == 0
                and int8pack_available())

    def matmul(self, x2d: torch.Tensor, layer) -> torch.Tensor:
        if x2d.shape[0] > GEMV_MAX_ROWS:
            return prefill_matmul(x2d, layer)
        xb = x2d.to(torch.bfloat16).contiguous()  # the kernel needs a unit-stride last dim
        # Scales are bf16-representable (see primitives), so the kernel's bf16 scale is
        # exact. This path is overhead-bound: keep it short.
        y = torch.ops.aten._weight_int8pack_mm(xb, layer.qweight, layer.scale_bf16)
        if layer.zero_point is not None:
            # sum_k x_k (q_nk - z_n) s_n = (x q^T)_n s_n - (sum_k x_k) z_n s_n
            # Sum the same bf16 activations the kernel saw, so the two terms cancel.
            y = y.float() - xb.float().sum(dim=1, keepdim=True) * layer.zero_scale
        return y


class CpuVnni(CpuInt8Pack):
    """CPU with AVX-512 VNNI: hetero_llm's GEMV for up to 4 rows, CpuInt8Pack beyond.

    Activations are split into two int8 levels (~15-bit precision) and multiplied
    with VNNI in one pass over the weight: ~1.5-2x int8pack's speed and ~80x less
    error than its bf16 activations (see kernels/cpu_vnni.py). Symmetric
    per-channel weights; an asymmetric layer uses the int8pack path.
    """

    name = "cpu-vnni"

    def supports(self, in_features: int, device: torch.device, group_size: int | None = None) -> bool:
        from ..kernels.cpu_vnni import K_MULTIPLE, vnni_kernel, vnni_possible
        return (super().supports(in_features, device, group_size) and in_features % K_MULTIPLE == 0
                and vnni_possible() and vnni_kernel() is not None)

    def matmul(self, x2d: torch.Tensor, layer) -> torch.Tensor:
        from ..kernels.cpu_vnni import MAX_ROWS, a16w8_gemv
        if x2d.shape[0] <= MAX_ROWS and layer.zero_point is None:
            return a16w8_gemv(x2d, layer.qweight, layer.scale, layer.rowsum)
        return super().matmul(x2d, layer)


class TritonInt8:
    """CUDA: hetero_llm's Triton W8A16 kernels (a GEMV for decode, tensor-core tiles for prefill).

    Per-channel or per-group scales (group a multiple of 16), optional zero point.
    """

    name = "triton-int8"

    def supports(self, in_features: int, device: torch.device, group_size: int | None = None) -> bool:
        from ..kernels.int8_linear import TRITON_AVAILABLE
        return (device.type == "cuda" and TRITON_AVAILABLE and torch.cuda.is_available()
                and (group_size is None or group_size % 16 == 0))

    def matmul(self, x2d: torch.Tensor, layer) -> torch.Tensor:
        from ..kernels.int8_linear import int8_linear_triton
        return int8_linear_triton(x2d, layer.qweight, layer.scale, layer.zero_point)


BACKENDS = {b.name: b for b in (CpuVnni(), CpuInt8Pack(), TritonInt8(), TorchReference())}


class BackendSlot:
    """Mixin: a module's `backend` name and the strategy's matmul, bound once.

    Decode calls the matmul ~200 times a token, so the lookup happens when the
    backend is set, not on every call. Subclasses name their registry.
    """

    BACKEND_REGISTRY: dict = {}

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = name
        self._matmul = self.BACKEND_REGISTRY[name].matmul


def usable_backend(in_features: int, device: torch.device, preferred: str = "auto",
                   group_size: int | None = None, asymmetric: bool = False) -> str:
    """`preferred` if it runs this layer here, else the fastest that does.

    A plan made on another machine or for another shape may name a kernel that
    cannot run this layer: never run a kernel out of spec.
    """
    chosen = pick_backend(in_features, device, preferred, group_size)
    if not BACKENDS[chosen].supports(in_features, device, group_size):
        chosen = pick_backend(in_features, device, "auto", group_size)
    if chosen == "cpu-vnni" and asymmetric:
        chosen = "cpu-int8pack"  # the VNNI GEMV takes symmetric weights only
    return chosen


def pick_backend(in_features: int, device: torch.device, preferred: str = "auto",
                 group_size: int | None = None) -> str:
    """The fastest backend that supports this layer on this device."""
    if preferred != "auto":
        return preferred
    for name in ("cpu-vnni", "cpu-int8pack", "triton-int8", "torch-dequant"):
        if BACKENDS[name].supports(in_features, device, group_size):
            return name
    return "torch-dequant"
