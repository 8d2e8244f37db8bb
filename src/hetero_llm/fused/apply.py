"""The kernels pass: attention implementation, fused projections, fused norms."""
from __future__ import annotations

import torch
from torch import nn

from .._modules import parent_of, replace_module
from . import attention_interface
from ..integrations import hf_adapter as hf
from ..errors import UnsupportedArchitectureError
from ..integrations.transformers import ArchitectureSpec, spec_by_family
from ..plan import Fusion, Plan
from ..quant.modules import Int8Linear, linear_weight
from ..quant.primitives import QuantizedWeight
from ..quant.w8a8 import W8A8Linear
from . import decoder_layer
from .modules import FusedProjection, GatedMLP, ProjectionSlice, RMSNorm, RotaryAttention


def _cat_bias(members: list[nn.Module]) -> torch.Tensor | None:
    biases = [getattr(m, "bias", None) for m in members]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach().float() if b is not None else torch.zeros(m.out_features, device=m_dev(m))
                      for m, b in zip(members, biases)])


def m_dev(m: nn.Module) -> torch.device:
    for t in m.buffers():
        return t.device
    return next(m.parameters()).device


def _fuse_w8a8(members: list[W8A8Linear], bias: torch.Tensor | None) -> W8A8Linear:
    """Members read one input, so they were calibrated with one smoothing vector and outlier set."""
    first = members[0]
    for m in members[1:]:
        for attr in ("smooth", "outlier_index"):
            a, b = getattr(first, attr), getattr(m, attr)
            differ = a is not None and b is not None and a.device.type != "meta" and not torch.equal(a, b)
            if (a is None) != (b is None) or differ:
                raise ValueError(f"cannot fuse W8A8 linears with different {attr}")
    n_out = 0 if first.outlier_index is None else first.outlier_index.numel()
    fused = W8A8Linear(first.in_features, sum(m.out_features for m in members), bias=bias is not None,
                       n_outliers=n_out, smooth=first.smooth is not None, backend=first.backend,
                       device=first.qweight.device)
    fused.qweight = torch.cat([m.qweight for m in members])
    fused.scale = torch.cat([m.scale for m in members])
    fused.bias = bias
    fused.smooth, fused.outlier_index = first.smooth, first.outlier_index
    if n_out:
        fused.outlier_weight = torch.cat([m.outlier_weight for m in members])
    return fused


def fuse_linears(members: list[nn.Module]) -> nn.Module:
    """One linear computing every member's output, concatenated along the output dim."""
    bias = _cat_bias(members)
    if all(isinstance(m, W8A8Linear) for m in members):
        return _fuse_w8a8(members, bias)
    if all(isinstance(m, Int8Linear) for m in members):
        first = members[0]
        zps = [m.zero_point for m in members]
        fused = Int8Linear(first.in_features, sum(m.out_features for m in members), bias=bias is not None,
                           asymmetric=zps[0] is not None, backend=first.backend, device=first.qweight.device,
                           group_size=first.group_size, scheme=first.scheme)
        qw = QuantizedWeight(torch.cat([m.qweight for m in members]), torch.cat([m.scale for m in members]),
                             None if zps[0] is None else torch.cat(zps))
        fused.load_quantized(qw, bias)
        return fused
    weights = [linear_weight(m).detach() for m in members]
    w = torch.cat(weights)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
        if bias is not None:
            fused.bias.copy_(bias.to(w.dtype))
    fused.requires_grad_(False)
    return fused


def _refuse_unknown_children(module: nn.Module, name: str, spec: ArchitectureSpec, role: str) -> None:
    """A fused module replaces `module` whole and keeps only the children it knows: refuse one
    with any other child rather than drop it."""
    unknown = spec.unknown_children(module, role)
    if unknown:
        raise UnsupportedArchitectureError(
            f"{name} ({type(module).__name__}) has a child {unknown[0]!r} that the {spec.family} table does not "
            f"describe (it knows {sorted(spec.children(role))}); its fused replacement would drop it. Plan this "
            "model again with hetero_llm.plan(model) (the planner leaves such modules to transformers), or pass "
            "KernelConfig(fuse_projections=False).")


def apply_gated_mlp(model: nn.Module, fusion: Fusion, spec: ArchitectureSpec, backend: str = "torch") -> None:
    mlp = model.get_submodule(fusion.name)
    _refuse_unknown_children(mlp, fusion.name, spec, "mlp")
    act_attr, down_attr = spec.gated_mlp_act, spec.roles["down"].rsplit(".", 1)[-1]
    gate, up = (model.get_submodule(n) for n in fusion.members)
    fused = GatedMLP(fuse_linears([gate, up]), getattr(mlp, down_attr), getattr(mlp, act_attr), gate.out_features,
                     backend=backend)
    replace_module(model, fusion.name, fused)


def apply_rotary_attention(model: nn.Module, fusion: Fusion, spec: ArchitectureSpec, backend: str = "torch") -> None:
    attn = model.get_submodule(fusion.name)
    _refuse_unknown_children(attn, fusion.name, spec, "attention")
    q, k, v = (model.get_submodule(n) for n in fusion.members)
    heads, kv_heads = q.out_features // attn.head_dim, k.out_features // attn.head_dim
    norms = [attn.get_submodule(spec.roles[r].rsplit(".", 1)[-1]) if r in spec.roles else None
             for r in ("q_norm", "k_norm")]
    replace_module(model, fusion.name, RotaryAttention(attn, fuse_linears([q, k, v]), heads, kv_heads, backend,
                                                       *norms))


def apply_fusion(model: nn.Module, fusion: Fusion) -> None:
    members = [model.get_submodule(n) for n in fusion.members]
    fused = FusedProjection(fuse_linears(members), [m.out_features for m in members])
    parent, _ = parent_of(model, fusion.members[0])
    parent.add_module(f"hetero_{fusion.kind}", fused)
    for i, (name, m) in enumerate(zip(fusion.members, members)):
        replace_module(model, name, ProjectionSlice(fused, i, m.in_features))


def _norm_offset(plan: Plan) -> float:
    spec = spec_by_family(plan.family)
    return 1.0 if spec is not None and spec.norm_style == "rms_plus_one" else 0.0


def swap_norm(model: nn.Module, name: str, offset: float, backend: str = "torch") -> None:
    old = model.get_submodule(name)
    eps = getattr(old, "variance_epsilon", getattr(old, "eps", 1e-6))
    replace_module(model, name, RMSNorm(old.weight, eps, offset, backend))


def _set_attention(model: nn.Module, attn: str | None) -> None:
    if not attn or hf.attention_implementation(model) == attn:
        return
    if attn == attention_interface.NAME:
        attention_interface.register()  # adds a name to transformers' registry; changes no other model
    hf.set_attention_implementation(model, attn)


NORM_KERNELS = {"torch-rms_norm": "torch", "triton-rms_norm": "triton", "triton-add_rms_norm": "triton"}


def kernels_pass(model: nn.Module, plan: Plan) -> list[tuple[str, str, str]]:
    swaps = []
    _set_attention(model, plan.model_settings.get("attn_implementation"))
    backend = plan.model_settings.get("kernels", "torch")
    offset = _norm_offset(plan)
    for e in plan.by_action("swap"):
        if e.kernel in NORM_KERNELS:
            swap_norm(model, e.name, offset, NORM_KERNELS[e.kernel])
            swaps.append((e.name, e.module_type, "RMSNorm"))
    spec = spec_by_family(plan.family)
    for f in plan.fusions:
        if f.kind == "gated_mlp":
            apply_gated_mlp(model, f, spec, backend)
            swaps.append((f.name, "MLP", "GatedMLP"))
        elif f.kind == "rotary_attention":
            apply_rotary_attention(model, f, spec, backend)
            swaps.append((f.name, "Attention", "RotaryAttention"))
        elif f.kind == "decoder_layer":
            continue  # after every part of the block is in place: below
        else:
            apply_fusion(model, f)
            swaps.extend((n, "linear", f"ProjectionSlice of {f.kind}") for n in f.members)
    for f in plan.fusions:
        if f.kind == "decoder_layer":
            layer = model.get_submodule(f.name)
            decoder_layer.bind(layer, spec)
            swaps.append((f.name, type(layer).__name__, "forward with fused residual adds"))
    return swaps
