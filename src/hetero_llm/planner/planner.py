"""The planner: hardware + model profile + options -> Plan. Never touches the model."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..config import Options
from ..errors import HardwareError
from ..hardware import Hardware
from ..integrations.transformers import (ArchitectureSpec, map_roles, model_type_of, require_spec,
                                         spec_for)
from ..kernels.cpu_vnni import K_MULTIPLE as VNNI_K_MULTIPLE
from ..kernels.cpu_vnni import vnni_possible
from ..quant.backends import BACKENDS
from ..quant.schemes import QuantSpec, spec_for_options
from ..quant.w8a8 import BACKENDS as W8A8_BACKENDS

from . import cost
from .plan import Fusion, Plan, PlanEntry, Prediction
from .profile import ModuleProfile, profile_model

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def choose_device(requested: str, hardware: Hardware) -> str:
    if requested == "auto":
        return "cuda" if hardware.gpus else "cpu"
    if requested == "cuda" and not hardware.gpus:
        raise HardwareError(f"device='cuda' was asked for but {hardware.name!r} has no CUDA GPU; "
                            "use device='cpu' or 'auto'.")
    return requested


def choose_scheme(options: Options, device: str) -> tuple[str, str]:
    """(scheme, why) for the model's linears."""
    scheme = options.quantize.scheme
    if scheme == "auto":
        if device == "cpu":
            return "int8", ("decode on CPU is memory-bound: INT8 weights read 4x fewer bytes than fp32 "
                            "and per-channel scales keep accuracy")
        return "none", ("on a GPU, quantize='auto' keeps the model's dtype: the Triton INT8 kernels are opt-in "
                         "(quantize='int8' or 'w8a8') until their speed is measured on a GPU")
    if scheme == "none":
        return "none", "quantize='none' was asked for"
    return scheme, f"quantize={scheme!r} was asked for"


def choose_kernel_backend(options: Options, device: str, hardware: Hardware) -> str:
    """"triton" or "torch", for attention, norms and residual adds (each entry says why)."""
    asked = options.kernels.backend
    if asked == "torch":
        return "torch"
    if device == "cuda":
        if hardware.triton.can_run_gpu_kernels:
            return "triton"
        if asked == "triton":
            raise HardwareError(f"kernels='triton' was asked for but {hardware.name!r} cannot compile Triton kernels "
                                "for its GPU (Triton missing or too old); install triton, or use kernels='auto'.")
        return "torch"
    if asked == "triton":
        from ..kernels.triton_utils import interpreted  # imports triton: only when asked for
        if interpreted():  # Triton's CPU interpreter: for debugging kernels, slow
            return "triton"
        raise HardwareError("kernels='triton' needs a CUDA GPU: on a CPU, Triton kernels run only in Triton's "
                            "interpreter (set TRITON_INTERPRET=1 before anything imports triton; for debugging, "
                            "very slow). Use kernels='auto' for the fast CPU path.")
    return "torch"


def _linear_kernel(p: ModuleProfile, device: str, options: Options, spec: QuantSpec,
                   triton_gpu: bool = False) -> tuple[str, str]:
    """(kernel, note) for a quantized linear. `triton_gpu`: the plan's hardware compiles Triton for its GPU."""
    import torch  # local: keeps planning importable without touching devices
    dev = torch.device(device)
    if spec.activations:
        if options.kernels.backend != "torch" and W8A8_BACKENDS["cpu-intmm"].supports(p.in_features, dev):
            return "cpu-intmm", ""
        if options.kernels.backend != "torch" and device == "cuda" and triton_gpu:
            return "triton-w8a8", "Triton per-token quantize + INT8 tensor-core GEMM"
        return "torch-w8a8", "reference W8A8 path (quantize per token, exact integer matmul in fp64)"
    if options.kernels.backend == "torch":
        return "torch-dequant", "kernels='torch': reference INT8 path"
    group = spec.group_size if spec.granularity == "group" else None
    if BACKENDS["cpu-int8pack"].supports(p.in_features, dev, group):
        # Checked without compiling; accelerate() falls back to int8pack if the build fails.
        if not spec.asymmetric and p.in_features % VNNI_K_MULTIPLE == 0 and vnni_possible():
            return "cpu-vnni", ""
        return "cpu-int8pack", ""
    if device == "cpu" and group is not None:
        return "torch-dequant", "no CPU INT8 kernel takes per-group scales: reference path (slower)"
    if device == "cpu" and p.in_features % 16:
        return "torch-dequant", f"in_features={p.in_features} is not a multiple of 16: reference INT8 path"
    if device == "cpu":
        return "torch-dequant", "this torch build has no usable int8 GEMV kernel: reference INT8 path"
    if triton_gpu and (group is None or group % 16 == 0):
        return "triton-int8", "Triton INT8 GEMV (decode) / tensor-core GEMM (prefill)"
    return "torch-dequant", "no Triton here: reference INT8 path (dequantize, then matmul)"


def _linear_spec(p: ModuleProfile, options: Options, scheme: str, tied_lm_head: bool) -> tuple[QuantSpec, str]:
    """The quantization of one linear under the options, and why it differs if it does."""
    q = options.quantize
    spec = spec_for_options(scheme, q.granularity, q.group_size)
    if p.role == "lm_head" and tied_lm_head and q.embeddings:
        return QuantSpec(), "tied to the embedding: shares its INT8 rows (symmetric, per row)"
    if p.role == "lm_head" and spec.activations:
        return QuantSpec(), "weight-only for the output projection: logits are the most sensitive output"
    if spec.granularity == "group" and p.in_features % spec.group_size:
        return QuantSpec(asymmetric=spec.asymmetric), \
            f"in_features={p.in_features} is not a multiple of group_size={spec.group_size}: per channel"
    return spec, ""


def _plan_linear(p: ModuleProfile, device: str, options: Options, scheme: str, why: str,
                 roof: cost.Roofline, tied_lm_head: bool, triton_gpu: bool = False) -> PlanEntry:
    before = cost.linear_us(p, roof, "torch", _BYTES.get(p.dtype, 4))
    base = PlanEntry(p.name, p.module_type, p.role, "keep", device, "torch", reason=why,
                     params=p.params, decode_us_before=before, decode_us_after=before)
    if scheme == "none":
        return base
    if p.role == "lm_head" and not options.quantize.lm_head:
        return replace(base, reason="QuantConfig(lm_head=False): output projection kept in floating point")
    if p.dtype == "int8":
        return replace(base, reason="already INT8")
    spec, spec_note = _linear_spec(p, options, scheme, tied_lm_head)
    kernel, note = _linear_kernel(p, device, options, spec, triton_gpu)
    after = cost.linear_us(p, roof, kernel, 1.0)
    # The scheme's own reason, unless this layer differs from it; then what it got and why.
    head = spec.describe() if spec_note else why
    if not spec_note and (spec.granularity != "channel" or spec.activations):
        head = f"{why}; {spec.describe()}"
    reason = "; ".join(r for r in (head, spec_note, note) if r)
    if p.role == "lm_head" and tied_lm_head and not options.quantize.embeddings:
        reason += "; tied to the embedding, which keeps its floating-point copy for lookups"
    return replace(base, action="quantize", kernel=kernel, quant=str(spec), reason=reason, decode_us_after=after)


def _plan_embedding(p: ModuleProfile, base: PlanEntry, options: Options, scheme: str,
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


def _plan_other(p: ModuleProfile, device: str, spec: ArchitectureSpec | None, options: Options,
                roof: cost.Roofline, scheme: str = "none", backend: str = "torch") -> PlanEntry:
    base = PlanEntry(p.name, p.module_type, p.role, "keep", device, "torch", params=p.params)
    if spec is None:
        return replace(base, action="skip", reason="unknown architecture: no role table, left untouched")
    if p.kind == "embedding":
        # Gemma's embedding multiplies its lookups by sqrt(hidden); Int8Embedding keeps that factor.
        plain = p.module_type == "Embedding" or p.module_type.endswith("ScaledWordEmbedding")
        return _plan_embedding(p, base, options, scheme, plain)
    if p.kind == "norm":
        t = cost.norm_us("torch", roof)
        if spec.norm_style == "layer":
            t = cost.norm_us("torch-layer_norm", roof)
            return replace(base, reason="LayerNorm is already one torch kernel", decode_us_before=t, decode_us_after=t)
        if not options.kernels.fuse_norms:
            return replace(base, reason="fuse_norms=False", decode_us_before=t, decode_us_after=t)
        if backend == "triton":
            return replace(base, action="swap", kernel="triton-rms_norm", decode_us_before=t,
                           decode_us_after=cost.norm_us("triton-rms_norm", roof),
                           reason="RMSNorm's seven small ops become one Triton kernel (statistics in fp32)")
        return replace(base, action="swap", kernel="torch-rms_norm", decode_us_before=t,
                       decode_us_after=cost.norm_us("torch-rms_norm", roof),
                       reason="RMSNorm's seven small ops become torch's single rms_norm")
    if p.kind == "attention":
        t = cost.attention_us("sdpa", roof)
        if backend == "triton":
            return replace(base, action="swap", kernel="triton-attention", decode_us_before=t,
                           decode_us_after=cost.attention_us("triton", roof),
                           reason="Triton flash attention (prefill) and split-KV flash decoding (one token), "
                                  "through transformers' attention interface")
        return replace(base, kernel="sdpa", decode_us_before=t, decode_us_after=t,
                       reason="scaled_dot_product_attention (fused, KV cache kept)")
    return replace(base, action="skip", reason=f"{p.module_type} has no role in the {spec.family} table")


def _fusions(entries: dict[str, PlanEntry], groups, options: Options, roof, backend: str = "torch") -> list[Fusion]:
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
                decode_us_after=cost.attention_us("triton", roof),
                reason="one q/k/v matmul, q and k rotated together; Triton flash attention for prompts, "
                       "split-KV flash decoding for single tokens")
        elif kind == "rotary_attention":
            entries[fused_name] = replace(
                entries[fused_name], action="swap", kernel="sdpa+rotary",
                decode_us_after=cost.attention_us("rotary", roof),
                reason="one q/k/v matmul, q and k rotated together, SDPA with GQA; same math, fewer ops")
        saved = cost.CALL_OVERHEAD_US[roof.device]
        for m in members[1:]:
            entries[m] = replace(entries[m], decode_us_after=max(entries[m].decode_us_after - saved, 0.0),
                                 kernel=f"{entries[m].kernel}+fused:{kind}")
        entries[members[0]] = replace(entries[members[0]], kernel=f"{entries[members[0]].kernel}+fused:{kind}")
    return out


def _residual_fusions(model: nn.Module, spec: ArchitectureSpec | None, entries: dict[str, PlanEntry],
                      fusions: list[Fusion], roof: cost.Roofline) -> list[Fusion]:
    """Llama-style blocks whose residual adds go into the o/down matmuls (linear_add) or the
    post-attention norm (add + RMSNorm): the block's attention, MLP and both norms must all be
    swapped for fused modules, and the block must have nothing else."""
    from ..kernels.decoder_layer import LAYER_CHILDREN

    if spec is None or spec.attention_style != "rotary" or not spec.gated_mlp_act:
        return []
    swapped = {f.name for f in fusions if f.kind in ("rotary_attention", "gated_mlp")}
    out = []
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        prefix = f"{spec.layers}.{i}"
        parts = {r: f"{prefix}.{spec.roles[r]}" for r in ("attention", "mlp", "attn_norm", "mlp_norm", "o", "down")}
        norms = [entries.get(parts[r]) for r in ("attn_norm", "mlp_norm")]
        if (set(dict(layer.named_children())) != LAYER_CHILDREN or not {parts["attention"], parts["mlp"]} <= swapped
                or any(e is None or e.kernel != "triton-rms_norm" for e in norms)):
            continue
        out.append(Fusion(prefix, tuple(parts[r] for r in ("attention", "mlp", "attn_norm", "mlp_norm")),
                          "decoder_layer"))
        for role in ("o", "down"):
            e = entries[parts[role]]
            saved = cost.add_us(roof)
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


def _prediction(entries: dict[str, PlanEntry], profiles: list[ModuleProfile], tied: set[str],
                n_blocks: int, roof: cost.Roofline) -> Prediction:
    fixed = cost.fixed_overhead_us(n_blocks, roof)
    before = fixed + sum(e.decode_us_before for e in entries.values())
    after = fixed + sum(e.decode_us_after for e in entries.values())
    w_before = sum(p.weight_bytes for p in profiles if p.name not in tied)
    shares_embedding = any(e.action == "quantize" and e.role == "embed" for e in entries.values())
    w_after = 0
    for p in profiles:
        e = entries[p.name]
        if e.action == "quantize":
            if p.name in tied and shares_embedding and e.quant == "int8":
                continue  # reads the embedding's INT8 rows
            spec = QuantSpec.parse(e.quant)
            groups = p.in_features // spec.group_size if spec.granularity == "group" else 1
            per_row = 4 * groups * (2 if spec.asymmetric else 1) + (4 if p.has_bias else 0)
            # int8 weight + fp32 scales (+ int32 zero points, fp32 bias); an untied copy when not shared
            w_after += p.params + per_row * max(p.out_features, 1)
        elif p.name not in tied or (shares_embedding and p.role == "lm_head"):
            # a kept lm_head tied to an embedding that became INT8 holds the float table alone
            w_after += p.weight_bytes
    return Prediction(before / 1e3, after / 1e3, w_before / 2**20, w_after / 2**20)


def _tied(model: nn.Module) -> set[str]:
    """Modules whose weight is the same Parameter as an earlier module's (a tied lm_head)."""
    seen, tied = set(), set()
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        if id(w) in seen:
            tied.add(name)
        seen.add(id(w))
    return tied


def make_plan(model: nn.Module, hardware: Hardware, options: Options, *, strict: bool = True) -> Plan:
    """Decide, per module, what accelerate() will do; the model is not changed."""
    spec = require_spec(model) if strict else spec_for(model)
    role_map = map_roles(model, spec) if spec is not None else None
    profiles = profile_model(model, role_map.roles if role_map else None)
    device = choose_device(options.placement.device, hardware)
    roof = cost.roofline(hardware, device)
    scheme, why = choose_scheme(options, device)
    tied = _tied(model)
    # GPU profiles describe machines with Triton; an inspected machine reports its own.
    triton_gpu = device == "cuda" and hardware.triton.can_run_gpu_kernels
    backend = choose_kernel_backend(options, device, hardware)
    entries: dict[str, PlanEntry] = {}
    for p in profiles:
        if p.kind == "linear":
            entries[p.name] = _plan_linear(p, device, options, scheme, why, roof, p.name in tied, triton_gpu)
        else:
            entries[p.name] = _plan_other(p, device, spec, options, roof, scheme, backend)
    fusions = _fusions(entries, role_map.fusion_groups if role_map else [], options, roof, backend)
    if backend == "triton":
        fusions += _residual_fusions(model, spec, entries, fusions, roof)
    notes = []
    if spec is None:
        notes.append(f"model_type {model_type_of(model)!r} has no role table: Linear layers are "
                     "handled generically, everything else is left untouched")
    if role_map and role_map.missing:
        notes.append(f"{len(role_map.missing)} table entries not found in this model "
                     f"(first: {role_map.missing[0]})")
    n_blocks = sum(1 for p in profiles if p.kind == "attention") or 1
    prediction = _prediction(entries, profiles, tied, n_blocks, roof)
    capacity = hardware.gpus[0].memory_bytes if device == "cuda" else hardware.cpu.memory_bytes
    if prediction.weight_mb_after * 2**20 > capacity:
        notes.append(f"the weights ({prediction.weight_mb_after / 1024:.1f} GiB) exceed {device} memory "
                     f"({capacity / 2**30:.1f} GiB): this version does not split a model across devices")
    ordered = list(entries.values())
    settings = {}
    if hasattr(model, "set_attn_implementation"):
        settings["attn_implementation"] = "hetero_llm" if backend == "triton" else "sdpa"
    settings["kernels"] = backend
    return Plan(model_type=model_type_of(model), family=spec.family if spec else None, device=device,
                hardware=hardware.to_dict(), options=options.to_dict(), entries=tuple(ordered),
                fusions=tuple(fusions), model_settings=settings,
                prediction=prediction, notes=tuple(notes))
