"""Model profile: every module the planner decides about, with shapes and bytes.

Reads only shapes and dtypes, so it works on meta-device models of any size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..integrations.hf_adapter import looks_like_norm
from ..integrations.transformers import NORM_ROLES
from ..quant.embedding import Int8Embedding, TiedInt8Linear
from ..quant.modules import Int8Linear, is_linear, linear_weight
from ..quant.w8a8 import W8A8Linear

QUANTIZED_LINEARS = (Int8Linear, W8A8Linear, TiedInt8Linear)


@dataclass(frozen=True)
class ModuleProfile:
    name: str
    module_type: str
    kind: str  # "linear" | "norm" | "embedding" | "attention" | "other"
    role: str
    in_features: int = 0
    out_features: int = 0
    params: int = 0
    weight_bytes: int = 0
    dtype: str = "float32"
    has_bias: bool = False

    def decode_flops(self) -> int:
        """FLOPs for one token through this module (2 per multiply-add)."""
        return 2 * self.in_features * self.out_features if self.kind == "linear" else 2 * self.params


def _own_params(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _profile_linear(name: str, module: nn.Module, role: str) -> ModuleProfile:
    if isinstance(module, QUANTIZED_LINEARS):
        return ModuleProfile(name, type(module).__name__, "linear", role, module.in_features,
                             module.out_features, module.qweight.numel(),
                             module.qweight.numel(), "int8", module.bias is not None)
    w = linear_weight(module)
    out_f, in_f = w.shape
    return ModuleProfile(name, type(module).__name__, "linear", role, in_f, out_f, w.numel(),
                         w.numel() * w.element_size(), _dtype_name(w), getattr(module, "bias", None) is not None)


def _classify(name: str, module: nn.Module, role: str | None) -> ModuleProfile | None:
    mtype = type(module).__name__
    if is_linear(module) or isinstance(module, QUANTIZED_LINEARS):
        return _profile_linear(name, module, role or "linear")
    if isinstance(module, Int8Embedding):
        n = module.qweight.numel()
        return ModuleProfile(name, mtype, "embedding", role or "embed", module.embedding_dim,
                             module.num_embeddings, n, n, "int8")
    if isinstance(module, nn.Embedding):
        w = module.weight
        return ModuleProfile(name, mtype, "embedding", role or "embed", w.shape[1], w.shape[0], w.numel(),
                             w.numel() * w.element_size(), _dtype_name(w))
    if role in NORM_ROLES or (role is None and looks_like_norm(module)):
        w = module.weight
        return ModuleProfile(name, mtype, "norm", role or "norm", w.numel(), w.numel(), w.numel(),
                             w.numel() * w.element_size(), _dtype_name(w))
    if role == "attention" or mtype.endswith("Attention"):
        return ModuleProfile(name, mtype, "attention", role or "attention")
    own = _own_params(module)
    if own:
        n = sum(t.numel() for t in own)
        return ModuleProfile(name, mtype, "other", role or "other", params=n,
                             weight_bytes=sum(t.numel() * t.element_size() for t in own),
                             dtype=_dtype_name(own[0]))
    return None


def profile_model(model: nn.Module, roles: dict[str, str] | None = None) -> list[ModuleProfile]:
    """Profiles in module order. `roles` (name -> role) comes from the architecture table."""
    roles = roles or {}
    out: list[ModuleProfile] = []
    for name, module in model.named_modules():
        if not name:
            continue
        p = _classify(name, module, roles.get(name))
        if p is not None:
            out.append(p)
    return out
