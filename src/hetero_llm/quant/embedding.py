"""INT8 token embeddings, and an output projection tied to them.

An embedding (vocab, hidden) quantized per row is, read as a linear, a weight
quantized per output channel: a tied lm_head can use the very same integer
weight and scales. `TiedInt8Linear` holds no tensors of its own; it reads the
embedding's, so the tie survives .to(), state_dict() and save/load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backends import BACKENDS, BackendSlot, usable_backend
from .primitives import QuantizedWeight, dequantize, quantize_symmetric


class Int8Embedding(nn.Module):
    """nn.Embedding with int8 rows and one fp32 scale per row (symmetric)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.dtype = dtype  # what the model's layers expect from a lookup
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, device=device))
        self.register_buffer("scale_bf16", None, persistent=False)
        self.register_buffer("rowsum", None, persistent=False)  # for a tied lm_head's VNNI kernel
        # Gemma's ScaledWordEmbedding multiplies lookups by sqrt(hidden); 1.0 elsewhere.
        self.embed_scale = 1.0
        self._refresh()

    def _refresh(self) -> None:
        self.scale = self.scale.float()
        self.scale_bf16 = self.scale.to(torch.bfloat16)  # exact: scales are bf16-representable
        self.rowsum = self.qweight.sum(dim=1, dtype=torch.int32)

    @classmethod
    def shaped_like(cls, module: nn.Embedding, device=None) -> "Int8Embedding":
        """An empty Int8Embedding for `module` (shape, dtype, padding, Gemma's factor)."""
        w = module.weight
        layer = cls(w.shape[0], w.shape[1], dtype=w.dtype, padding_idx=module.padding_idx,
                    device=w.device if device is None else device)
        factor = getattr(module, "embed_scale", None)
        if factor is not None:
            # transformers multiplies in the weight dtype: round the factor the same way.
            layer.embed_scale = float(torch.as_tensor(factor).to(w.dtype))
        return layer

    @classmethod
    def from_embedding(cls, module: nn.Embedding, name: str = "embedding") -> "Int8Embedding":
        layer = cls.shaped_like(module)
        qw = quantize_symmetric(module.weight, name)
        layer.qweight, layer.scale = qw.qweight, qw.scale
        layer._refresh()
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scale)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (a new tensor): for code that reads embedding.weight."""
        return dequantize(self.quantized_weight(), self.dtype)

    def _apply(self, fn, recurse=True):
        scale = self.scale
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.qweight.device))
        result = super()._apply(fn, recurse)
        self.dtype = probe.dtype  # model.half() asks lookups for fp16
        self.scale = scale.to(self.qweight.device)
        self._refresh()
        return result

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight)
        out = rows.float() * self.scale[ids].unsqueeze(-1)
        if self.embed_scale != 1.0:
            out = out * self.embed_scale
        return out.to(self.dtype)

    def extra_repr(self) -> str:
        extra = f", embed_scale={self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row, dtype={self.dtype}{extra}"


class TiedInt8Linear(BackendSlot, nn.Module):
    """An lm_head whose weight is the INT8 embedding's (weights tied)."""

    BACKEND_REGISTRY = BACKENDS
    bias = None
    zero_point = None
    zero_scale = None
    group_size = None
    scheme = "int8"

    def __init__(self, embedding: Int8Embedding, backend: str = "auto", device=None) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list: not a child, so its buffers are saved once
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        device = torch.device(device) if device is not None else embedding.qweight.device
        self.backend = usable_backend(self.in_features, device, backend)

    @property
    def embedding(self) -> Int8Embedding:
        return self._embedding[0]

    @property
    def qweight(self) -> torch.Tensor:
        return self.embedding.qweight

    @property
    def scale(self) -> torch.Tensor:
        return self.embedding.scale

    @property
    def scale_bf16(self) -> torch.Tensor:
        return self.embedding.scale_bf16

    @property
    def rowsum(self) -> torch.Tensor:
        return self.embedding.rowsum

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def quantized_weight(self) -> QuantizedWeight:
        return self.embedding.quantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features), self)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the INT8 embedding"
