"""The planner: hardware + model profile + options -> Plan. Never touches the model."""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .._cpu_load import BUSY_CORES
from ..config import Options, PruneConfig
from ..errors import HardwareError
from ..hardware import Hardware
from ..integrations import hf_adapter as hf
from ..integrations.transformers import (ArchitectureSpec, RoleMap, map_roles, model_type_of, require_spec,
                                         spec_for)
from ..kernels.cpu_vnni import K_MULTIPLE as VNNI_K_MULTIPLE
from ..kernels.cpu_vnni import vnni_possible
from ..quant.backends import BACKENDS
from ..quant.schemes import QuantSpec, spec_for_options
from ..quant.w8a8 import BACKENDS as W8A8_BACKENDS

from . import cost
from .cost import CostModel
from .blocks import plan_fusions, plan_other, residual_fusions
from ..plan import Plan, PlanEntry
from .parallel import check_parallel, plan_parallel
from .placement import split_for_budget
from .predict import DTYPE_BYTES, predict, quant_bytes
from .profile import ModuleProfile, profile_model
from .decoding import choose_decode
from .device_costs import DeviceCosts
from .precision import choose_compute_dtype
from .pruning import mark_pruning
from ..prune.structured import Shrink, plan_shrink, pruned_view


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


def _kernel_candidates(p: ModuleProfile, device: str, options: Options, spec: QuantSpec,
                       triton_gpu: bool = False) -> list[tuple[str, str]]:
    """(kernel, note) for every kernel that can run this quantized linear here, best guess first.
    `triton_gpu`: the plan's hardware compiles Triton for its GPU."""
    import torch  # local: keeps planning importable without touching devices
    dev = torch.device(device)
    if spec.activations:
        out = []
        if options.kernels.backend != "torch" and W8A8_BACKENDS["cpu-intmm"].supports(p.in_features, dev):
            out.append(("cpu-intmm", ""))
        if options.kernels.backend != "torch" and device == "cuda" and triton_gpu:
            out.append(("triton-w8a8", "Triton per-token quantize + INT8 tensor-core GEMM"))
        return out + [("torch-w8a8", "reference W8A8 path (quantize per token, exact integer matmul in fp64)")]
    if options.kernels.backend == "torch":
        return [("torch-dequant", "kernels='torch': reference INT8 path")]
    group = spec.group_size if spec.granularity == "group" else None
    out = []
    if BACKENDS["cpu-int8pack"].supports(p.in_features, dev, group):
        # Checked without compiling; accelerate() falls back to int8pack if the build fails.
        if not spec.asymmetric and p.in_features % VNNI_K_MULTIPLE == 0 and vnni_possible():
            out.append(("cpu-vnni", ""))
        out.append(("cpu-int8pack", ""))
    elif device == "cuda" and triton_gpu and (group is None or group % 16 == 0):
        out.append(("triton-int8", "Triton INT8 GEMV (decode) / tensor-core GEMM (prefill)"))
    if device == "cpu" and group is not None:
        note = "no CPU INT8 kernel takes per-group scales: reference path (slower)"
    elif device == "cpu" and p.in_features % 16:
        note = f"in_features={p.in_features} is not a multiple of 16: reference INT8 path"
    elif device == "cpu":
        note = "this torch build has no usable int8 GEMV kernel: reference INT8 path"
    else:
        note = "no Triton here: reference INT8 path (dequantize, then matmul)"
    return out + [("torch-dequant", "" if out else note)]


def _fastest_kernel(p: ModuleProfile, candidates: list[tuple[str, str]], quant: str,
                    cm: cost.CostModel) -> tuple[str, str, float]:
    """The candidate with the lowest predicted time: (kernel, note, microseconds)."""
    timed = sorted(((cm.linear_us(p, k, quant, quant_bytes(p, quant)), i, k, note)
                    for i, (k, note) in enumerate(candidates)))
    t, _, kernel, note = timed[0]
    if len(timed) > 1:
        others = ", ".join(f"{k} {u:.0f}" for u, _, k, _ in timed[1:])
        note = "; ".join(x for x in (note, f"fastest predicted ({t:.0f} µs; {others})") if x)
    return kernel, note, t


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


# Linears whose input comes straight out of a norm: few activation outliers, so W8A8 keeps
# accuracy there (SmoothQuant); down_proj's input and the logits are where it breaks.
W8A8_SAFE_ROLES = frozenset({"q", "k", "v", "qkv", "gate", "up", "gate_up", "fc_in"})
W8A8_MIN_GAIN = 1.2  # W8A8 must be predicted this much faster than weight-only to be worth it


def _layer_scheme(p: ModuleProfile, options: Options, scheme: str, why: str, device: str,
                  cm: cost.CostModel, triton_gpu: bool) -> tuple[str, str]:
    """The scheme of one linear: a user pin, else W8A8 where quantize='auto' finds the layer
    compute-bound at the workload's batch, else the model's scheme."""
    pinned = options.quantize.override_for(p.name)
    if pinned is not None:
        return pinned, f"pinned by QuantConfig.overrides: quantize={pinned!r}"
    if options.quantize.scheme != "auto" or scheme != "int8" or p.role not in W8A8_SAFE_ROLES or cm.batch == 1:
        return scheme, why
    t_int8 = _fastest_kernel(p, _kernel_candidates(p, device, options, QuantSpec(), triton_gpu), "int8", cm)[2]
    w8a8 = QuantSpec(activations=True)
    t_w8a8 = _fastest_kernel(p, _kernel_candidates(p, device, options, w8a8, triton_gpu), "w8a8", cm)[2]
    if t_w8a8 * W8A8_MIN_GAIN > t_int8:
        return scheme, why
    return "w8a8", (f"compute-bound at batch {cm.batch}: INT8 activations and weights predicted {t_w8a8:.0f} µs "
                    f"vs {t_int8:.0f} µs weight-only; its input comes out of a norm (few outliers); "
                    "needs calibration_data")


def _plan_linear(p: ModuleProfile, device: str, options: Options, scheme: str, why: str,
                 cm: cost.CostModel, tied_lm_head: bool, triton_gpu: bool = False) -> PlanEntry:
    before = cm.linear_us(p, "torch", None, quant_bytes(p, None))
    scheme, why = _layer_scheme(p, options, scheme, why, device, cm, triton_gpu)
    base = PlanEntry(p.name, p.module_type, p.role, "keep", device, "torch", reason=why,
                     params=p.params, decode_us_before=before, decode_us_after=before)
    if scheme == "none":
        return base
    if p.role == "lm_head" and not options.quantize.lm_head:
        return replace(base, reason="QuantConfig(lm_head=False): output projection kept in floating point")
    if p.dtype == "int8":
        return replace(base, reason="already INT8")
    spec, spec_note = _linear_spec(p, options, scheme, tied_lm_head)
    kernel, note, after = _fastest_kernel(p, _kernel_candidates(p, device, options, spec, triton_gpu),
                                          str(spec), cm)
    # The scheme's own reason, unless this layer differs from it; then what it got and why.
    head = spec.describe() if spec_note else why
    if not spec_note and (spec.granularity != "channel" or spec.activations):
        head = f"{why}; {spec.describe()}"
    reason = "; ".join(r for r in (head, spec_note, note) if r)
    if p.role == "lm_head" and tied_lm_head and not options.quantize.embeddings:
        reason += "; tied to the embedding, which keeps its floating-point copy for lookups"
    return replace(base, action="quantize", kernel=kernel, quant=str(spec), reason=reason, decode_us_after=after)


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


def _kv_bytes_per_token(model: nn.Module, dtype_bytes: int) -> tuple[float, int]:
    """(KV-cache bytes one layer stores per token, hidden size), from the model's config."""
    cfg = getattr(model, "config", None)
    cfg = hf.text_config(cfg)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if hidden else 0))
    return 2.0 * kv_heads * head_dim * dtype_bytes, hidden


# Decode modes whose steps the cost model prices differently (the decisions stay the same).
DECODE_COSTS = {"cuda_graph": cost.graphed, "native": cost.native_cpu}


def _plan_device(model: nn.Module, spec, role_map, profiles: list[ModuleProfile], tied: set[str],
                 hardware: Hardware, options: Options, device: str, cpu_costs: DeviceCosts | None,
                 decode: str | None = None) -> tuple:
    """Entries, fused groups, cost model and kernel backend for the whole model on `device`
    (`decode`: a decode mode whose steps cost less per op, see DECODE_COSTS)."""
    work = options.workload
    costs = cost.device_costs(hardware, device, cpu_costs)
    cm = cost.CostModel(DECODE_COSTS[decode](costs) if decode else costs, work.batch_size, work.prompt_len)
    scheme, why = choose_scheme(options, device)
    # GPU profiles describe machines with Triton; an inspected machine reports its own.
    triton_gpu = device == "cuda" and hardware.triton.can_run_gpu_kernels
    backend = choose_kernel_backend(options, device, hardware)
    dtype = next((p.dtype for p in profiles if p.kind == "linear"), "float32")
    kv_bytes, _ = _kv_bytes_per_token(model, DTYPE_BYTES.get(dtype, 4))
    entries: dict[str, PlanEntry] = {}
    for p in profiles:
        if p.kind == "linear":
            entries[p.name] = _plan_linear(p, device, options, scheme, why, cm, p.name in tied, triton_gpu)
        else:
            entries[p.name] = plan_other(p, device, spec, options, cm, scheme, backend, kv_bytes)
    fusions = plan_fusions(entries, role_map.fusion_groups if role_map else [], options, cm, backend, kv_bytes)
    if backend == "triton":
        fusions += residual_fusions(model, spec, entries, fusions, cm)
    return entries, fusions, cm, backend


@dataclass
class _Inputs:
    """What every step of one make_plan call reads."""

    model: nn.Module  # the model as planned (a pruned meta view with structured pruning)
    spec: ArchitectureSpec | None
    role_map: RoleMap | None
    profiles: list[ModuleProfile]
    tied: set[str]
    hardware: Hardware
    options: Options
    cpu_costs: DeviceCosts | None
    shrink: Shrink | None

    def plan_device(self, device: str, decode: str | None = None) -> tuple:
        return _plan_device(self.model, self.spec, self.role_map, self.profiles, self.tied, self.hardware,
                            self.options, device, self.cpu_costs, decode=decode)

    def mark_pruning(self, entries: dict, cm: CostModel | None = None) -> list[str]:
        extra = {} if cm is None else dict(hardware=self.hardware, cm=cm, tp=self.options.placement.tp)
        return mark_pruning(entries, self.profiles, self.options.prune, self.tied, self.shrink, **extra)


def make_plan(model: nn.Module, hardware: Hardware, options: Options, *, strict: bool = True,
              cpu_costs: DeviceCosts | None = None) -> Plan:
    """Decide, per module, what accelerate() will do; the model is not changed.

    `cpu_costs`: this CPU's measured costs (measure.py) when `hardware` is the machine planning;
    None plans from tables. The planner only reads them: it never measures.

    With structured pruning the plan is made for the pruned architecture (a meta-device copy
    with the smaller config), so entries, sizes and predictions describe the model as it will be.
    """
    spec = require_spec(model) if strict else spec_for(model)
    shrink, original = None, model
    if options.prune.method == "structured":
        shrink = plan_shrink(model, spec, options.prune)
        model = pruned_view(model, spec, shrink)
    role_map = map_roles(model, spec) if spec is not None else None
    inputs = _Inputs(model, spec, role_map, profile_model(model, role_map.roles if role_map else None),
                     _tied(model), hardware, options, cpu_costs, shrink)
    device = choose_device(options.placement.device, hardware)
    entries, fusions, cm, backend = inputs.plan_device(device)
    prune_notes = inputs.mark_pruning(entries, cm)
    notes = _model_notes(inputs, cm) + prune_notes
    dtype = next((p.dtype for p in inputs.profiles if p.kind == "linear"), "float32")
    kv_bytes, hidden = _kv_bytes_per_token(model, DTYPE_BYTES.get(dtype, 4))
    prediction = predict(entries, inputs.profiles, inputs.tied, cm, options.workload.prompt_len, hidden)
    if shrink is not None:  # "before" is the model as given, not the pruned one
        prediction = _before_pruning(original, hardware, options, strict, prediction, cpu_costs)
    placed = _place(inputs, device, entries, fusions, cm, kv_bytes, hidden, prediction, notes)
    ordered, fusions, prediction, device_map, offload, parallel = placed
    multi_device = parallel is not None or bool(device_map) or bool(offload)
    settings, ordered, prediction = _settings(inputs, device, backend, fusions, ordered, prediction, hidden,
                                              multi_device, notes)
    return Plan(model_type=model_type_of(model), family=spec.family if spec else None, device=device,
                hardware=hardware.to_dict(), options=options.to_dict(), entries=tuple(ordered),
                fusions=tuple(fusions), model_settings=settings,
                prediction=prediction, notes=tuple(notes), device_map=device_map, offload=offload,
                parallel=parallel)


def _model_notes(inputs: _Inputs, cm: CostModel) -> list[str]:
    """What the plan says about the costs it used and how well the table fits the model."""
    notes, spec, role_map = [], inputs.spec, inputs.role_map
    others = cm.costs.others_cores
    if others is not None and others >= BUSY_CORES:
        notes.append(f"costs: measured while other processes used {others:.1f} cores of this CPU, so the "
                     "predictions are pessimistic; they are measured again once the machine is quiet")
    if spec is None:
        notes.append(f"model_type {model_type_of(inputs.model)!r} has no role table: Linear layers are "
                     "handled generically, everything else is left untouched")
    if role_map and role_map.unknown_children:
        first, children = next(iter(role_map.unknown_children.items()))
        notes.append(f"{len(role_map.unknown_children)} attention/MLP modules have children the {spec.family} table "
                     f"does not describe (first: {first}: {', '.join(children)}): they are not replaced by fused "
                     "modules, which would drop them; their q/k/v and gate/up still run as one matmul")
    if role_map and role_map.missing:
        notes.append(f"{len(role_map.missing)} table entries not found in this model "
                     f"(first: {role_map.missing[0]})")
    return notes


def _place(inputs: _Inputs, device: str, entries: dict, fusions: list, cm: CostModel, kv_bytes: float,
           hidden: int, prediction, notes: list[str]) -> tuple:
    """(entries in order, fusions, prediction, device_map, offload, parallel): tp/pp shards, a
    GPU plan split with the CPU when it does not fit, or the whole model on one device."""
    options, hardware = inputs.options, inputs.hardware
    ordered, device_map, offload, parallel = list(entries.values()), {}, (), None
    if options.placement.tp * options.placement.pp > 1:
        check_parallel(inputs.spec)
        entries, parallel, prediction, par_notes = plan_parallel(inputs.model, inputs.spec, entries, inputs.profiles,
                                                                 inputs.tied, options, device, prediction)
        ordered = list(entries.values())
        notes.extend(par_notes)
    elif device == "cuda":
        def cpu_plan():
            planned = inputs.plan_device("cpu")
            inputs.mark_pruning(planned[0])
            return planned
        placed = split_for_budget(inputs.spec, inputs.profiles, inputs.tied, hardware, options, entries, fusions, cm,
                                  kv_bytes, hidden, prediction, cpu_plan)
        if placed is not None:
            ordered, fusions, prediction, device_map, offload, split_notes = placed
            notes.extend(split_notes)
    else:
        budget = options.placement.max_memory.get("cpu", hardware.cpu.memory_bytes)
        if prediction.weight_mb_after * 2**20 > budget:
            notes.append(f"the weights ({prediction.weight_mb_after / 1024:.1f} GiB) exceed the CPU's "
                         f"{budget / 2**30:.1f} GiB: the model does not fit this machine (no disk offload)")
    return ordered, fusions, prediction, device_map, offload, parallel


def _settings(inputs: _Inputs, device: str, backend: str, fusions: list, ordered: list, prediction, hidden: int,
              multi_device: bool, notes: list[str]) -> tuple[dict, list, object]:
    """(model_settings, entries, prediction): the attention implementation, kernels, compute dtype
    and decode mode, with decode re-predicted for a step without per-op dispatch."""
    model, spec, options = inputs.model, inputs.spec, inputs.options
    settings = {}
    attention = "hetero_llm" if backend == "triton" else "sdpa"
    if spec is not None and hf.supports_attention_implementation(model, attention):
        settings["attn_implementation"] = attention
    elif spec is not None:
        notes.append(f"attention: {type(model).__name__} does not take the {attention!r} implementation; "
                     "its own stays")
    settings["kernels"] = backend
    compute_dtype, dtype_note = choose_compute_dtype(model, device, ordered)
    if compute_dtype is not None:
        settings["compute_dtype"] = compute_dtype
        notes.append(dtype_note)
    settings["decode"], decode_note = choose_decode(model, spec, options, device, fusions, multi_device,
                                                       ordered, inputs.hardware.cpu.isa, compute_dtype)
    notes.append(decode_note)
    if settings["decode"] in DECODE_COSTS:  # the same decisions; decode costs without per-op dispatch
        stepped, _, cm_step, _ = inputs.plan_device(device, decode=settings["decode"])
        inputs.mark_pruning(stepped, cm_step)
        ordered = [replace(e, decode_us_after=stepped[e.name].decode_us_after) for e in ordered]
        step = predict({e.name: e for e in ordered}, inputs.profiles, inputs.tied, cm_step,
                       options.workload.prompt_len, hidden)
        prediction = replace(prediction, decode_ms_after=step.decode_ms_after)
    return settings, ordered, prediction


def _before_pruning(model: nn.Module, hardware: Hardware, options: Options, strict: bool, prediction,
                    cpu_costs: DeviceCosts | None):
    """The prediction's "before" figures for the unpruned model in one process."""
    unpruned = replace(options, prune=PruneConfig(), placement=replace(options.placement, tp=1, pp=1))
    before = make_plan(model, hardware, unpruned, strict=strict, cpu_costs=cpu_costs).prediction
    return replace(prediction, decode_ms_before=before.decode_ms_before, weight_mb_before=before.weight_mb_before,
                   prefill_ms_before=before.prefill_ms_before)
