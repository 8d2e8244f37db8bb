"""Whole-model predictions from the plan entries: decode step, prompt, and weight memory.

Amdahl's law in its plain form: the model's time is the sum of its modules' times plus the
per-step cost of generate(), so a decision that speeds up one part changes only that part.
"""
from __future__ import annotations

from ..quant.schemes import QuantSpec
from .cost import CostModel
from ..plan import PlanEntry, Prediction
from .profile import ModuleProfile

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def quant_bytes(p: ModuleProfile, quant: str | None) -> float:
    """Weight bytes a decode step reads: INT8 values plus their scales (and zero points)."""
    if not quant:
        return p.in_features * p.out_features * DTYPE_BYTES.get(p.dtype, 4)
    spec = QuantSpec.parse(quant)
    groups = p.in_features // spec.group_size if spec.granularity == "group" else 1
    return p.in_features * p.out_features + 4 * groups * (2 if spec.asymmetric else 1) * p.out_features


def attention_style(kernel: str) -> str:
    """The block style whose measured cost applies to an attention entry's kernel."""
    if kernel.startswith("triton"):
        return "triton"
    return "rotary" if kernel.endswith("+rotary") else "sdpa"


def entry_weight_bytes(p: ModuleProfile, e: PlanEntry, shares_embedding: bool, tied: bool) -> int:
    """Bytes this module holds after the plan (0 when it reads another module's weights)."""
    if e.action == "quantize" and p.kind == "linear":
        if tied and shares_embedding and e.quant == "int8":
            return 0  # reads the embedding's INT8 rows
        spec = QuantSpec.parse(e.quant)
        groups = p.in_features // spec.group_size if spec.granularity == "group" else 1
        per_row = 4 * groups * (2 if spec.asymmetric else 1) + (4 if p.has_bias else 0)
        # int8 weight + fp32 scales (+ zero points, fp32 bias); an untied copy when not shared
        return p.params + per_row * max(p.out_features, 1)
    if e.action == "quantize":  # an INT8 embedding: one byte per value and one scale per row
        return p.params + 4 * max(p.out_features, 1)
    if not tied or (shares_embedding and p.role == "lm_head"):
        # a kept lm_head tied to an embedding that became INT8 holds the float table alone
        return p.weight_bytes
    return 0


def _prefill_us(p: ModuleProfile, e: PlanEntry, cm: CostModel, rows: int, after: bool,
                hidden: int) -> float:
    """One prompt of `rows` tokens (all sequences) through one module."""
    if p.kind == "linear":
        kernel, quant = (e.kernel, e.quant) if after and e.action != "keep" else ("torch", None)
        if p.role == "lm_head":
            rows = cm.batch  # generate() asks for the last position's logits only (logits_to_keep=1)
        return cm.linear_us(p, kernel, quant, quant_bytes(p, quant), rows=rows)
    elementwise = rows * hidden * 4 * 8 / (cm.costs.read_gbs * 1e3)  # a few passes over the activations
    if p.kind == "norm":
        return (cm.norm_us(e.kernel) if after else cm.norm_us("torch")) + elementwise
    if p.kind == "attention":
        style = attention_style(e.kernel) if after else "sdpa"
        fp = cm.linear_cost("torch", None, "bfloat16" if cm.device == "cuda" else "float32")
        per_seq = rows / cm.batch
        flops = 2.0 * cm.batch * per_seq * per_seq * hidden  # QK^T and PV, causal half
        gflops = cm.costs.attention_gflops or fp.throughput(per_seq)  # measured SDPA, else its GEMMs'
        return cm.block_us(style) + flops / (gflops * 1e3) + 4 * elementwise
    return 0.0


def predict(entries: dict[str, PlanEntry], profiles: list[ModuleProfile], tied: set[str], cm: CostModel,
            prompt_len: int, hidden: int, extra_decode_us: float = 0.0) -> Prediction:
    """Decode-step and prompt times before and after the plan, and the weights' size."""
    styles = [attention_style(e.kernel) for e in entries.values() if e.role == "attention"]
    style_after = "triton" if "triton" in styles else "rotary" if "rotary" in styles else "sdpa"
    before = cm.step_us("sdpa") + sum(e.decode_us_before for e in entries.values())
    after = cm.step_us(style_after) + sum(e.decode_us_after for e in entries.values()) + extra_decode_us
    rows = cm.batch * prompt_len
    pre_before = sum(_prefill_us(p, entries[p.name], cm, rows, False, hidden) for p in profiles)
    pre_after = sum(_prefill_us(p, entries[p.name], cm, rows, True, hidden) for p in profiles)
    shares = any(e.action == "quantize" and e.role == "embed" for e in entries.values())
    w_before = sum(p.weight_bytes for p in profiles if p.name not in tied)
    w_after = sum(entry_weight_bytes(p, entries[p.name], shares, p.name in tied) for p in profiles)
    return Prediction(before / 1e3, after / 1e3, w_before / 2**20, w_after / 2**20,
                      prefill_ms_before=pre_before / 1e3, prefill_ms_after=pre_after / 1e3)
