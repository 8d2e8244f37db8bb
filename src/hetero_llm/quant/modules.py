"""Quantized modules that replace nn.Linear (and GPT-2's Conv1D) in a model."""
from __future__ import annotations

import torch
from torch import nn

from ..integrations.hf_adapter import is_conv1d
from .backends import BACKENDS, GEMV_MAX_ROWS, BackendSlot, usable_backend
from .primitives import QuantizedWeight, dequantize, quantize_weight
from .schemes import QuantSpec


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a transformers Conv1D (stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class Int8Linear(BackendSlot, nn.Module):
    """y = x W^T + b with W held as INT8 plus per-output-channel fp32 scales.

    The integer weight is what is stored and read at run time (no fake
    quantization). `backend` names the strategy in quant.backends that
    computes the matmul; the torch reference always works.
    """

    BACKEND_REGISTRY = BACKENDS

    def __init__(self, in_features: int, out_features: int, *, bias: bool, asymmetric: bool,
                 backend: str = "torch-dequant", device=None, group_size: int | None = None,
                 scheme: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme or ("int8-asym" if asymmetric else "int8")
        self.group_size = group_size
        self.backend = backend
        shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32, device=device)
                             if asymmetric else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        # Derived, not saved: rebuilt from the saved buffers by _refresh().
        self.register_buffer("scale_bf16", None, persistent=False)
        self.register_buffer("zero_scale", None, persistent=False)
        self.register_buffer("rowsum", None, persistent=False)  # sum of each int8 row (VNNI kernel)
        self._refresh()

    def _refresh(self) -> None:
        # model.to(fp16) casts every floating buffer; scales and biases stay fp32.
        self.scale = self.scale.float()
        if self.bias is not None:
            self.bias = self.bias.float()
        self.scale_bf16 = self.scale.to(torch.bfloat16)  # exact: scales are bf16-representable
        self.zero_scale = None if self.zero_point is None else self.zero_point.float() * self.scale
        self.rowsum = self.qweight.sum(dim=1, dtype=torch.int32)
        if hasattr(self, "_backend"):
            self.backend = self._backend  # the matmul may cache per-device state

    @classmethod
    def from_linear(cls, module: nn.Module, scheme: str = "int8", backend: str = "auto",
                    name: str = "weight") -> "Int8Linear":
        spec = QuantSpec.parse(scheme)
        weight = linear_weight(module)
        qw = quantize_weight(weight, name, asymmetric=spec.asymmetric, granularity=spec.granularity,
                             group_size=spec.group_size)
        bias = getattr(module, "bias", None)
        return cls.from_quantized(qw, None if bias is None else bias.detach().float(), scheme, backend)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, scheme: str,
                       backend: str = "auto") -> "Int8Linear":
        out_f, in_f = qw.qweight.shape
        device = qw.qweight.device
        chosen = usable_backend(in_f, device, backend, qw.group_size, qw.zero_point is not None)
        layer = cls(in_f, out_f, bias=bias is not None, asymmetric=qw.zero_point is not None, backend=chosen,
                    device=device, group_size=qw.group_size, scheme=scheme)
        layer.load_quantized(qw, bias)
        return layer

    def load_quantized(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        self.qweight = qw.qweight.contiguous()
        self.group_size = qw.group_size
        self.scale = qw.scale.float().contiguous()
        self.zero_point = None if qw.zero_point is None else qw.zero_point.int().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self._refresh()

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scale, self.zero_point)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.quantized_weight(), dtype)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the buffers; the derived ones follow. A dtype cast
        # (model.half()) would round the fp32 scales and biases: keep the fp32
        # values and only move them.
        scale, bias = self.scale, self.bias
        result = super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device)
        self.bias = None if bias is None else bias.to(self.bias.device)
        self._refresh()
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features), self)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_fused(self, x: torch.Tensor, epilogue: str, addend: torch.Tensor | None = None):
        """This layer on a prompt with `epilogue` done in the same pass over its output ("add":
        + addend; "silu_glu": silu(first half) * second half, as a gated MLP's fused gate/up
        needs), or None where its kernels have no such pass (decode rows, GPUs, a bias, zero
        points, a GEMM other than the two-level int8 one): the caller runs the separate ops.
        fp32 only, so that the fused result rounds as the separate ops do."""
        rows = x.numel() // self.in_features
        if (rows <= GEMV_MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.float32 or self.bias is not None
                or self.backend not in ("cpu-vnni", "cpu-int8pack") or self.group_size is not None):
            return None
        if addend is not None:
            if addend.dtype != torch.float32 or addend.shape[-1] != self.out_features:
                return None
            addend = addend.reshape(-1, self.out_features)
        from .cpu_prefill import fused_prefill_matmul
        y = fused_prefill_matmul(x.reshape(-1, self.in_features), self, epilogue, addend)
        return None if y is None else y.reshape(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}, backend={self.backend}")
