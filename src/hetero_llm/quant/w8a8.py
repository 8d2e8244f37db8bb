"""W8A8: INT8 weights x INT8 activations quantized per token at run time.

y = (x * smooth) W'^T + b, where W' = W / smooth (SmoothQuant: the smoothing
vector moves activation outliers into the weights, where per-channel scales
absorb them). Input channels listed in `outlier_index` can be kept out of
the integer matmul and computed in floating point (LLM.int8()-style).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.cpu_int_mm import int_mm_available
from .backends import BackendSlot
from .primitives import QuantizedWeight, dequantize, quantize_per_token, quantize_weight

_TINY = torch.finfo(torch.float32).tiny


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token in the fewest CPU ops; zero rows give q = 0 (any scale is exact)."""
    scale = x.abs().amax(dim=1, keepdim=True).div_(127.0).clamp_(min=_TINY)
    return torch.round(x / scale).to(torch.int8), scale


class TorchW8A8:
    """Reference: per-token quantization, then an exact integer product in fp64."""

    name = "torch-w8a8"

    def supports(self, in_features: int, device: torch.device) -> bool:
        return True

    def matmul(self, x2d: torch.Tensor, layer: "W8A8Linear") -> torch.Tensor:
        q, s = quantize_per_token(x2d)
        acc = q.double() @ layer.qweight.double().T  # exact: |sum| < 2^53
        return (acc * s.double() * layer.scale.double()).float()


class CpuIntMM:
    """CPU: torch._int_mm (oneDNN, VNNI) on the int8 weight read in place through a transposed view.

    Measured on AVX-512 VNNI with 2 cores: at 512 rows about 2x a bf16 GEMM of
    the same shape; at one row about as fast as the weight-only GEMV.
    """

    name = "cpu-intmm"

    def supports(self, in_features: int, device: torch.device) -> bool:
        # torch._int_mm on CPU returns uninitialized memory for K = 1 (torch 2.13): reference path.
        return device.type == "cpu" and in_features > 1 and int_mm_available()

    def matmul(self, x2d: torch.Tensor, layer: "W8A8Linear") -> torch.Tensor:
        q, s = _quantize_rows(x2d.float())
        return torch._int_mm(q, layer.qweight_t).mul(s).mul_(layer.scale)


class TritonW8A8:
    """CUDA: Triton per-token quantize kernel, then the INT8 tensor-core GEMM (int32 accumulation)."""

    name = "triton-w8a8"

    def supports(self, in_features: int, device: torch.device) -> bool:
        from ..kernels.int8_gemm import TRITON_AVAILABLE
        return device.type == "cuda" and TRITON_AVAILABLE and torch.cuda.is_available()

    def matmul(self, x2d: torch.Tensor, layer: "W8A8Linear") -> torch.Tensor:
        from ..kernels.int8_gemm import int8_gemm_triton, quantize_per_token_triton
        xq, xs = quantize_per_token_triton(x2d)
        return int8_gemm_triton(xq, xs, layer.qweight, layer.scale, out_dtype=torch.float32)


BACKENDS = {b.name: b for b in (CpuIntMM(), TritonW8A8(), TorchW8A8())}


def pick_backend(in_features: int, device: torch.device, preferred: str = "auto") -> str:
    if preferred in BACKENDS and BACKENDS[preferred].supports(in_features, device):
        return preferred
    for name in ("cpu-intmm", "triton-w8a8", "torch-w8a8"):
        if BACKENDS[name].supports(in_features, device):
            return name
    return "torch-w8a8"


class W8A8Linear(BackendSlot, nn.Module):
    """Linear with INT8 per-channel weights and INT8 per-token activations.

    Buffers (all saved): qweight (out, in) int8, scale (out,) fp32, bias,
    smooth (in,) fp32 multiplier on x (None: no smoothing), outlier_index
    (n,) int64 and outlier_weight (out, n) fp32 for input channels kept in
    floating point (None: none).
    """

    scheme = "w8a8"
    BACKEND_REGISTRY = BACKENDS

    def __init__(self, in_features: int, out_features: int, *, bias: bool, n_outliers: int = 0,
                 smooth: bool = False, backend: str = "torch-w8a8", device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features, device=device) if smooth else None)
        self.register_buffer("outlier_index", torch.zeros(n_outliers, dtype=torch.long, device=device)
                             if n_outliers else None)
        self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers, device=device)
                             if n_outliers else None)
        self.backend = backend

    @property
    def qweight_t(self) -> torch.Tensor:
        return self.qweight.t()  # a view: _int_mm reads (in, out) without a copy

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, smooth: torch.Tensor | None = None,
                    outliers: torch.Tensor | None = None, backend: str = "auto",
                    name: str = "weight") -> "W8A8Linear":
        """Quantize a float (out, in) weight. `smooth` multiplies x; W is divided by it first."""
        w = weight.detach().float()
        out_f, in_f = w.shape
        n_out = 0 if outliers is None else int(outliers.numel())
        if smooth is not None:
            w = w / smooth.float()[None, :]
        layer = cls(in_f, out_f, bias=bias is not None, n_outliers=n_out, smooth=smooth is not None,
                    backend=pick_backend(in_f, w.device, backend), device=w.device)
        if n_out:
            layer.outlier_index = outliers.to(torch.long, copy=True).to(w.device)
            layer.outlier_weight = w[:, layer.outlier_index].contiguous()
            w = w.index_fill(1, layer.outlier_index, 0.0)  # those inputs never reach the int8 matmul
        qw = quantize_weight(w, name)
        layer.qweight, layer.scale = qw.qweight, qw.scale
        if smooth is not None:
            layer.smooth = smooth.float().contiguous().to(w.device)
        if bias is not None:
            layer.bias = bias.detach().float().contiguous()
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scale)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer applies to the un-smoothed input (for checks)."""
        w = dequantize(self.quantized_weight())
        if self.outlier_index is not None:
            w[:, self.outlier_index] = self.outlier_weight
        return w if self.smooth is None else w * self.smooth[None, :]

    def _apply(self, fn, recurse=True):
        # A dtype cast (model.half()) must not round scales, smoothing or the fp parts.
        keep = {n: getattr(self, n) for n in ("scale", "bias", "smooth", "outlier_weight")}
        result = super()._apply(fn, recurse)
        for n, t in keep.items():
            if t is not None:
                setattr(self, n, t.to(self.qweight.device))
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.smooth is not None:
            x2 = x2 * self.smooth
        if self.outlier_index is not None:
            kept = x2.index_select(1, self.outlier_index).float()
            y = self._matmul(x2.index_fill(1, self.outlier_index, 0.0), self)
            y = torch.addmm(y.float(), kept, self.outlier_weight.T)
        else:
            y = self._matmul(x2, self)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        n = 0 if self.outlier_index is None else self.outlier_index.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"smooth={self.smooth is not None}, fp_outlier_channels={n}, backend={self.backend}")
