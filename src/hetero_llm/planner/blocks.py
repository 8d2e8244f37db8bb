"""Plan entries for everything that is not a quantized linear: embeddings, norms, attention,
and the fused groups (q/k/v, gate/up, whole decoder layers), each with its predicted time."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..config import Options
from ..integrations.transformers import ArchitectureSpec
from .cost import CostModel
from ..plan import Fusion, PlanEntry
from .profile import ModuleProfile


def plan_embedding(p: ModuleProfile, base: PlanEntry, options: Options, scheme: str,
                    module_type_ok: bool) -> PlanEntry:
    keep = "a lookup reads one row per token: quantizing it saves memory, not time"
    if p.role != "embed" or scheme == "none":
        return replace(base, reason=keep)
    if not options.quantize.embeddings:
        return replace(base, reason="QuantConfig(embeddings=False): kept in floating point")
    if not module_type_ok:
        return replace(base, reason=f"{p.module_type} is not a plain nn.Embedding (it may scale its output): "
                                    "kept in floating point")
    return replace(base, action="quantize", quant="int8", kernel="int8-lookup",
                   reason="INT8 rows with one scale each: 4x less memory than fp32; a tied lm_head shares them")


def plan_other(p: ModuleProfile, device: str, spec: ArchitectureSpec | None, options: Options,
               cm: CostModel, scheme: str = "none", backend: str = "torch", kv_bytes: float = 0.0) -> PlanEntry:
    """Embeddings, norms and attention modules. `kv_bytes`: KV-cache bytes per token of one layer."""
    base = PlanEntry(p.name, p.module_type, p.role, "keep", device, "torch", params=p.params)
    if spec is None:
        return replace(base, action="skip", reason="unknown architecture: no role table, left untouched")
    if p.kind == "embedding":
        # Gemma's embedding multiplies its lookups by sqrt(hidden); Int8Embedding keeps that factor.
        plain = p.module_type == "Embedding" or p.module_type.endswith("ScaledWordEmbedding")
        return plan_embedding(p, base, options, scheme, plain)
    if p.kind == "norm":
        t = cm.norm_us("torch")
        if spec.norm_style == "layer":
            t = cm.norm_us("torch-layer_norm")
            return replace(base, reason="LayerNorm is already one torch kernel", decode_us_before=t, decode_us_after=t)
        if not options.kernels.fuse_norms:
            return replace(base, reason="fuse_norms=False", decode_us_before=t, decode_us_after=t)
        if backend == "triton":
            return replace(base, action="swap", kernel="triton-rms_norm", decode_us_before=t,
                           decode_us_after=cm.norm_us("triton-rms_norm"),
                           reason="RMSNorm's seven small ops become one Triton kernel (statistics in fp32)")
        return replace(base, action="swap", kernel="torch-rms_norm", decode_us_before=t,
                       decode_us_after=cm.norm_us("torch-rms_norm"),
                       reason="RMSNorm's seven small ops become torch's single rms_norm")
    if p.kind == "attention":
        t = cm.block_us("sdpa", kv_bytes)
        if backend == "triton":
            return replace(base, action="swap", kernel="triton-attention", decode_us_before=t,
                           decode_us_after=cm.block_us("triton", kv_bytes),
                           reason="Triton flash attention (prefill) and split-KV flash decoding (one token), "
                                  "through transformers' attention interface")
        return replace(base, kernel="sdpa", decode_us_before=t, decode_us_after=t,
                       reason="scaled_dot_product_attention (fused, KV cache kept)")
    return replace(base, action="skip", reason=f"{p.module_type} has no role in the {spec.family} table")


def plan_fusions(entries: dict[str, PlanEntry], groups, options: Options, cm: CostModel, backend: str = "torch",
                 kv_bytes: float = 0.0) -> list[Fusion]:
    """Linears that read one input become one matmul; rotary attention and gated MLPs become
    hetero_llm's fused modules. Fusing saves the members' per-call costs but the first's."""
    if not options.kernels.fuse_projections:
        return []
    out = []
    for fused_name, members, kind in groups:
        es = [entries[m] for m in members]
        if len({(e.action, e.kernel, e.quant, e.device) for e in es}) != 1:
            continue  # members planned differently cannot share one matmul
        out.append(Fusion(fused_name, tuple(members), kind))
        if kind == "rotary_attention" and backend == "triton":
            entries[fused_name] = replace(
                entries[fused_name], action="swap", kernel="triton-attention+rotary",
                decode_us_after=cm.block_us("triton", kv_bytes),
                reason="one q/k/v matmul, q and k rotated together; Triton flash attention for prompts, "
                       "split-KV flash decoding for single tokens")
        elif kind == "rotary_attention":
            entries[fused_name] = replace(
                entries[fused_name], action="swap", kernel="sdpa+rotary",
                decode_us_after=cm.block_us("rotary", kv_bytes),
                reason="one q/k/v matmul, q and k rotated together, SDPA with GQA; same math, fewer ops")
        for m in members[1:]:
            saved = cm.call_us(entries[m].kernel, entries[m].quant, "float32")
            entries[m] = replace(entries[m], decode_us_after=max(entries[m].decode_us_after - saved, 0.0),
                                 kernel=f"{entries[m].kernel}+fused:{kind}")
        entries[members[0]] = replace(entries[members[0]], kernel=f"{entries[members[0]].kernel}+fused:{kind}")
    return out


def decoder_layer_fusions(model: nn.Module, spec: ArchitectureSpec | None, entries: dict[str, PlanEntry],
                          fusions: list[Fusion]) -> list[Fusion]:
    """Llama-style blocks whose forward may be the fused layer forward: the block's attention,
    MLP and both norms are all swapped for fused modules, and the block has nothing else."""
    from ..fused.decoder_layer import layout_fits

    if spec is None or spec.attention_style != "rotary" or not spec.gated_mlp_act:
        return []
    swapped = {f.name for f in fusions if f.kind in ("rotary_attention", "gated_mlp")}
    out = []
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        prefix = f"{spec.layers}.{i}"
        parts = [f"{prefix}.{spec.roles[r]}" for r in ("attention", "mlp", "attn_norm", "mlp_norm")]
        norms = [entries.get(p) for p in parts[2:]]
        if (layout_fits(layer, spec) and set(parts[:2]) <= swapped
                and all(e is not None and e.action == "swap" for e in norms)):
            out.append(Fusion(prefix, tuple(parts), "decoder_layer"))
    return out


def residual_fusions(model: nn.Module, spec: ArchitectureSpec | None, entries: dict[str, PlanEntry],
                     fusions: list[Fusion], cm: CostModel) -> list[Fusion]:
    """Blocks of `decoder_layer_fusions` on the Triton path, whose residual adds go into the o/down
    matmuls (linear_add) or the post-attention norm (add + RMSNorm)."""
    out = [f for f in decoder_layer_fusions(model, spec, entries, fusions)
           if all(entries[n].kernel == "triton-rms_norm" for n in f.members[2:])]
    for f in out:
        prefix = f.name
        parts = {r: f"{prefix}.{spec.roles[r]}" for r in ("mlp_norm", "o", "down")}
        for role in ("o", "down"):
            e = entries[parts[role]]
            saved = cm.add_us()
            if e.action == "keep":  # a floating-point Linear: the add goes into its epilogue
                entries[e.name] = replace(e, action="swap", kernel="triton-linear_add",
                                          decode_us_after=max(e.decode_us_after - saved, 0.0),
                                          reason="matmul with the bias and the residual add in its epilogue "
                                                 "(Triton linear_add): one kernel instead of two")
            elif role == "o":  # quantized: the add moves into the next norm instead
                n = entries[parts["mlp_norm"]]
                entries[n.name] = replace(n, kernel="triton-add_rms_norm",
                                          decode_us_after=max(n.decode_us_after - saved, 0.0),
                                          reason="adds the attention output to the residual stream and "
                                                 "normalizes in one Triton pass")
    return out
