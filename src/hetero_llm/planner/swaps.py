"""The structural swaps a plan makes, by part, and plans with some parts taken out.

A *part* is one kind of module hetero_llm puts in place of transformers' own, whose contract with
transformers (arguments, caches, masks, return values) the self-check of `hetero_llm.selfcheck`
verifies on the installed release:

- "norms":               RMSNorm modules swapped for hetero_llm's fused RMSNorm
- "attention":           Llama-style attention replaced whole by RotaryAttention (fused q/k/v)
- "mlp":                 gated MLPs replaced whole by GatedMLP (fused gate/up)
- "projections":         linears that read one input computed as one matmul (ProjectionSlice)
- "decoder_layer":       the decoder layer's forward with its residual adds fused
- "attention_interface": "hetero_llm" registered as transformers' attention implementation
- "decode_step":         generate()/forward() bound on the instance with hetero_llm's decode step

Quantized linears are not a part: an Int8Linear stands where an nn.Linear stood and is called
the same way, so it keeps transformers' contract by construction.
"""
from __future__ import annotations

import re
from dataclasses import replace

from ..plan import Fusion, Plan, PlanEntry

PARTS = ("norms", "attention", "mlp", "projections", "decoder_layer", "attention_interface", "decode_step")
# A part only runs on top of these: without them it is taken out too.
REQUIRES = {"decoder_layer": ("attention", "mlp", "norms"), "decode_step": ("attention",)}

NORM_KERNELS = ("torch-rms_norm", "triton-rms_norm", "triton-add_rms_norm")
_FUSION_PARTS = {"rotary_attention": "attention", "gated_mlp": "mlp", "decoder_layer": "decoder_layer"}


def fusion_part(fusion: Fusion) -> str:
    return _FUSION_PARTS.get(fusion.kind, "projections")


def plan_parts(plan: Plan) -> tuple[str, ...]:
    """The parts this plan swaps in, in PARTS order."""
    used = {fusion_part(f) for f in plan.fusions}
    if any(e.action == "swap" and e.kernel in NORM_KERNELS for e in plan.entries):
        used.add("norms")
    if plan.model_settings.get("attn_implementation") == "hetero_llm":
        used.add("attention_interface")
    if plan.model_settings.get("decode") in ("static", "cuda_graph", "native"):
        used.add("decode_step")
    return tuple(p for p in PARTS if p in used)


def with_requirements_removed(removed: set[str] | frozenset[str] | tuple[str, ...]) -> set[str]:
    """`removed` plus every part that needs one of them."""
    out = set(removed)
    for part, needs in REQUIRES.items():
        if any(n in out for n in needs):
            out.add(part)
    return out


def _unfused(kernel: str) -> str:
    return kernel.split("+fused:", 1)[0]


def _entry_without(e: PlanEntry, removed: set[str], dropped_members: set[str], dropped_names: set[str],
                   reason: str) -> PlanEntry:
    if "norms" in removed and e.action == "swap" and e.kernel in NORM_KERNELS:
        return replace(e, action="keep", kernel="torch", reason=reason, decode_us_after=e.decode_us_before)
    if "decoder_layer" in removed and e.kernel == "triton-add_rms_norm":
        e = replace(e, kernel="triton-rms_norm")
    if "decoder_layer" in removed and e.kernel == "triton-linear_add":
        return replace(e, action="keep", kernel="torch", reason=reason, decode_us_after=e.decode_us_before)
    if e.name in dropped_names:  # a fused attention module back to transformers' own
        return replace(e, action="keep", kernel="sdpa", reason=reason, decode_us_after=e.decode_us_before)
    if e.name in dropped_members and "+fused:" in e.kernel:
        return replace(e, kernel=_unfused(e.kernel))
    return e


def without_parts(plan: Plan, parts, reason: str) -> Plan:
    """A copy of `plan` that leaves transformers' own modules where `parts` (and what needs them)
    would have gone; `reason` is recorded in the affected entries and the notes. Predicted times of
    the affected modules fall back to their "before" figures."""
    removed = with_requirements_removed(set(parts)) & set(plan_parts(plan))
    if not removed:
        return plan
    dropped = [f for f in plan.fusions if fusion_part(f) in removed]
    dropped_members = {m for f in dropped for m in f.members}
    dropped_names = {f.name for f in dropped if f.kind == "rotary_attention"}
    entries = tuple(_entry_without(e, removed, dropped_members, dropped_names, reason) for e in plan.entries)
    settings = dict(plan.model_settings)
    if "attention_interface" in removed:
        settings.pop("attn_implementation", None)  # the model's own implementation stays
    if "decode_step" in removed:
        settings["decode"] = "transformers"
    note = f"{reason} (left to transformers: {', '.join(p for p in PARTS if p in removed)})"
    return replace(plan, entries=entries, fusions=tuple(f for f in plan.fusions if f not in dropped),
                   model_settings=settings, notes=(*plan.notes, note))


def with_only_parts(plan: Plan, parts, model, spec) -> Plan:
    """For the self-check's tiny model: `plan` (made for the CPU with kernels="torch") with exactly
    `parts` swapped in. The torch-backend planner never binds the fused layer forward, the
    attention interface or the decode step; they are added here (on the CPU they run their torch
    paths: the same calls into transformers as on the GPU)."""
    from .blocks import decoder_layer_fusions

    wanted = set(parts)
    plan = without_parts(plan, set(PARTS) - wanted, "not under test")
    fusions = list(plan.fusions)
    if "decoder_layer" in wanted:
        entries = {e.name: e for e in plan.entries}
        fusions += decoder_layer_fusions(model, spec, entries, fusions)
    settings = dict(plan.model_settings)
    if "attention_interface" in wanted:
        settings["attn_implementation"] = "hetero_llm"
    if "decode_step" in wanted and any(f.kind == "rotary_attention" for f in fusions):
        settings["decode"] = "static"
    return replace(plan, fusions=tuple(fusions), model_settings=settings)


# -- quantized linears of families without a role table -------------------------------------------
# A known family calls its linears only as modules. An unknown one may also read a linear's weight
# directly (Mamba: `self.lm_head.weight.dtype`, `self.dt_proj.weight @ x`), which an INT8 module does
# not hold as a float tensor. The self-check finds such linears on a tiny model; they stay in float.

def linear_group(name: str) -> str:
    """The module's name with layer indices as "*": the same linear in every layer is one group."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def quantized_groups(plan: Plan) -> tuple[str, ...]:
    return tuple(dict.fromkeys(linear_group(e.name) for e in plan.entries if e.action == "quantize"))


def without_linear_groups(plan: Plan, groups, reason: str) -> Plan:
    """A copy of `plan` that keeps the linears of `groups` in floating point."""
    groups = set(groups)
    hit = {e.name for e in plan.entries if e.action == "quantize" and linear_group(e.name) in groups}
    if not hit:
        return plan
    entries = tuple(replace(e, action="keep", kernel="torch", quant=None, reason=reason,
                            decode_us_after=e.decode_us_before) if e.name in hit else e for e in plan.entries)
    fusions = tuple(f for f in plan.fusions if not hit & set(f.members))
    note = f"{reason} (kept in floating point: {', '.join(sorted(groups & set(map(linear_group, hit))))})"
    return replace(plan, entries=entries, fusions=fusions, notes=(*plan.notes, note))
