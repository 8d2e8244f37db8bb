"""Export-time stand-ins for hetero_llm's modules, and the ONNX form of an INT8 weight.

`export_copy(model)` returns a deep copy of a (possibly accelerated) model in which every
module whose forward is written for speed (kernel dispatch, cached fused outputs, integer
GEMV backends) is replaced by one computing the same math with plain, traceable torch ops:

- `Int8Linear` / `TiedInt8Linear` -> `QdqLinear`: y = x @ dequantize(W)^T + b, where
  dequantize is the custom op `hetero_llm::dequantize_int8`. Its ONNX translation is one
  `DequantizeLinear` on the INT8 initializer, so the file keeps the integer weight and a
  runtime sees the standard QDQ weight-only pattern (DequantizeLinear -> Transpose -> MatMul).
- `RotaryAttention` -> `ExportRotaryAttention`: the same projections and rotary pass, with
  attention as SDPA on an explicit mask (no shape-dependent kernel choice).
- `ProjectionSlice` -> `ExportProjectionSlice`: slices the fused output instead of caching it
  by tensor identity (ONNX Runtime's common-subexpression pass merges the repeated matmul).
The user's model is never changed.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import replace_module
from ..decode import uninstall as uninstall_decode
from ..integrations.hf_adapter import (attention_implementation, can_set_attention, set_attention_implementation,
                                       take_cache)
from ..fused.modules import ProjectionSlice, RotaryAttention
from ..quant.embedding import TiedInt8Linear
from ..quant.modules import Int8Linear
from ..quant.primitives import QuantizedWeight, dequantize


@torch.library.custom_op("hetero_llm::dequantize_int8", mutates_args=())
def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    block_size: int) -> torch.Tensor:
    """fp32 weight (out, in) from INT8 `qweight`, per-row `scale` (out,) or per-group (out, in //
    block_size), optional int8 `zero_point` shaped like `scale`. `block_size` 0: per row."""
    zp = None if zero_point is None else zero_point.to(torch.int32)
    return dequantize(QuantizedWeight(qweight, scale, zp), torch.float32)


@dequantize_int8.register_fake
def _dequantize_int8_fake(qweight, scale, zero_point, block_size):
    return qweight.new_empty(qweight.shape, dtype=torch.float32)


def dequantize_int8_onnx(qweight, scale, zero_point=None, block_size: int = 0):
    """ONNX translation of `hetero_llm::dequantize_int8`: one DequantizeLinear (opset >= 21 for
    per-group scales, which use its block_size attribute along the input axis)."""
    from onnxscript import opset21 as op

    inputs = (qweight, scale) if zero_point is None else (qweight, scale, zero_point)
    if block_size:
        return op.DequantizeLinear(*inputs, axis=1, block_size=block_size)
    return op.DequantizeLinear(*inputs, axis=0)


class QdqLinear(nn.Module):
    """y = x dequantize(W)^T + b on the INT8 weight (out, in): what `Int8Linear` computes, in
    ops the ONNX exporter turns into DequantizeLinear -> Transpose -> MatMul (-> Add)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        out_f, in_f = qweight.shape
        self.in_features, self.out_features = in_f, out_f
        self.block_size = 0 if scale.dim() == 1 else in_f // scale.shape[1]
        self.register_buffer("qweight", qweight)  # the model's own tensor: tied weights stay one
        self.register_buffer("scale", scale.float())
        # DequantizeLinear takes a zero point of the weight's type; ours are int32 holding int8 values.
        self.register_buffer("zero_point", None if zero_point is None else zero_point.to(torch.int8))
        self.register_buffer("bias", None if bias is None else bias.float())

    @classmethod
    def from_module(cls, module: nn.Module) -> "QdqLinear":
        return cls(module.qweight, module.scale, getattr(module, "zero_point", None), getattr(module, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.ops.hetero_llm.dequantize_int8(self.qweight, self.scale, self.zero_point, self.block_size)
        return F.linear(x.float(), w, self.bias).to(x.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """Attention of q (b, h, s, d) on k/v (b, hk, S, d): kv heads repeated, mask explicit."""
    h, hk = q.shape[1], k.shape[1]
    if h != hk:
        k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    if mask is None:  # causal, the new tokens being the last s of S (bottom-right aligned)
        s, total = q.shape[2], k.shape[2]
        mask = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class ExportRotaryAttention(RotaryAttention):
    """`RotaryAttention`'s math with SDPA on the mask transformers built (see module docstring)."""

    @classmethod
    def from_module(cls, attn: RotaryAttention) -> "ExportRotaryAttention":
        attn.__class__ = cls  # a module of the export copy: same children and attributes
        attn.backend = "torch"
        return attn

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, residual: torch.Tensor | None = None, **kwargs):
        b, s, _ = hidden_states.shape
        q, k, v = self.rotated_qkv(hidden_states, position_embeddings, take_cache(kwargs, past_key_values))
        out = _sdpa(q, k, v, attention_mask, self.scaling)
        y = self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        return (y if residual is None else y + residual), None


class ExportProjectionSlice(nn.Module):
    """One member's columns of a fused projection, computed without the identity cache."""

    def __init__(self, linear: nn.Module, start: int, size: int) -> None:
        super().__init__()
        self._linear = [linear]  # not a child: the fused module is registered once elsewhere
        self.start, self.size = start, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear[0](x).narrow(-1, self.start, self.size)


def _set_torch_backends(model: nn.Module) -> None:
    """Kernel modules keep a backend name; the export traces the torch path of each."""
    for m in model.modules():
        if m.__class__.__module__.startswith("hetero_llm.kernels") and isinstance(getattr(m, "backend", None), str):
            m.backend = "torch"


def export_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in fp32 with the stand-ins above swapped in (see module docstring)."""
    clone = copy.deepcopy(model)
    uninstall_decode(clone)  # the class's own forward: the graph traces transformers' decoding
    clone.float()  # bf16/fp16 models run in fp32 in the file; INT8 weights and fp32 scales are kept
    if can_set_attention(clone) and attention_implementation(clone) != "sdpa":
        set_attention_implementation(clone, "sdpa")
    _set_torch_backends(clone)
    # Slices first: they hold their fused linear outside the module tree, so swap it here.
    for name, m in list(clone.named_modules()):
        if isinstance(m, ProjectionSlice):
            start = sum(m.fused.sizes[: m.index])
            replace_module(clone, name, ExportProjectionSlice(m.fused.linear, start, m.out_features))
    swapped: dict[int, QdqLinear] = {}
    for name, m in list(clone.named_modules()):
        if isinstance(m, (Int8Linear, TiedInt8Linear)):
            swapped[id(m)] = QdqLinear.from_module(m)
            replace_module(clone, name, swapped[id(m)])
        elif isinstance(m, RotaryAttention):
            replace_module(clone, name, ExportRotaryAttention.from_module(m))
    for m in clone.modules():
        if isinstance(m, ExportProjectionSlice) and id(m._linear[0]) in swapped:
            m._linear[0] = swapped[id(m._linear[0])]
    clone.eval()
    return clone
