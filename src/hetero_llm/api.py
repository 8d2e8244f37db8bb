"""accelerate() and plan(): thin orchestration of checks, planner and passes."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .config import Options
from .errors import (AlreadyAcceleratedError, ForeignQuantizationError, HardwareError, HeteroLLMWarning,
                     InvalidOptionError, MetaDeviceError, NotAModelError, PlanMismatchError)
from .hardware import Hardware, hardware_profile, inspect_hardware
from .integrations.transformers import spec_by_family
from . import measure
from .parallel.shard import join_job
from .pipeline import PassContext, apply_plan
from .planner import Plan, make_plan
from .planner.profile import profile_model
from .prune.apply import prune_config
from .prune.structured import plan_shrink, pruned_view
from .quant.apply import calibrated_modules, check_quantizable
from .selfcheck import verify_plan

def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise NotAModelError(
            f"expected a transformers model (a torch.nn.Module with a .config), got {type(model).__name__}. "
            "Load one with transformers.AutoModelForCausalLM.from_pretrained(...).")


def _check_foreign_quantization(model: nn.Module) -> None:
    qc = getattr(model.config, "quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None or qc:
        method = getattr(qc, "quant_method", None) or (qc.get("quant_method") if isinstance(qc, dict) else None)
        raise ForeignQuantizationError(
            f"this model is already quantized by another library ({method or 'unknown method'}). "
            "hetero_llm quantizes from floating-point weights: load the unquantized checkpoint "
            "(or dequantize it, e.g. GGUF with from_pretrained(..., gguf_file=...) and save without "
            "its quantization_config), then call accelerate().")
    for name, module in model.named_modules():
        origin = type(module).__module__
        if origin.startswith(("bitsandbytes", "torchao", "torch.ao.nn.quantized", "auto_gptq", "awq")):
            raise ForeignQuantizationError(
                f"{name} is a {type(module).__name__} from {origin.split('.')[0]}: the model is already "
                "quantized. Start from the floating-point model.")


def _resolve_hardware(hardware: Hardware | str | None) -> Hardware:
    if hardware is None:
        return inspect_hardware()
    if isinstance(hardware, str):
        return hardware_profile(hardware)
    if isinstance(hardware, Hardware):
        return hardware
    raise InvalidOptionError(f"hardware must be a Hardware, a profile name or None; got {type(hardware).__name__}")


def plan(model: nn.Module, *, hardware: Hardware | str | None = None, strict: bool = True,
         **options: Any) -> Plan:
    """The decisions accelerate() would apply, without changing the model.

    Works on meta-device models. `hardware` may be a Hardware, a profile name
    such as "h100-80gb" or "cpu-2core", or None for this machine.
    """
    _check_model(model)
    return _make_plan(model, _resolve_hardware(hardware), Options.from_kwargs(**options), strict)


def _make_plan(model: nn.Module, hardware: Hardware, options: Options, strict: bool) -> Plan:
    """The planner, handed this CPU's measured costs when planning for this machine."""
    return make_plan(model, hardware, options, strict=strict, cpu_costs=measure.measured_cpu_costs(hardware))


def check_plan_matches(model: nn.Module, p: Plan) -> None:
    """Names, types and sizes must match, and fused groups must be computable together."""
    names = dict(model.named_modules())
    sizes = {m.name: m.params for m in profile_model(model)}
    for e in p.entries:
        module = names.get(e.name)
        found = "missing" if module is None else type(module).__name__
        if module is None or found != e.module_type or sizes.get(e.name, 0) != e.params:
            detail = found if found != e.module_type else f"{found} with {sizes.get(e.name, 0)} parameters"
            raise PlanMismatchError(
                f"the plan does not describe this model: {e.name} is {detail}, the plan expects "
                f"{e.module_type} with {e.params} parameters. Make the plan from this model: "
                "hetero_llm.plan(model).")
    entries = {e.name: e for e in p.entries}
    for f in p.fusions:
        if f.kind == "decoder_layer":  # a block and its parts, not linears sharing an input
            if f.name not in names or any(m not in names for m in f.members):
                raise PlanMismatchError(f"fused decoder layer {f.name}: the model lacks {f.name} or one of "
                                        f"{list(f.members)}. Make the plan from this model: hetero_llm.plan(model).")
            continue
        kinds = {(entries[m].action, entries[m].quant) for m in f.members if m in entries}
        if len(kinds) != 1 or any(m not in entries for m in f.members):
            raise PlanMismatchError(
                f"fused group {f.name} mixes members planned differently ({sorted(map(str, kinds))}); "
                "remove the group from plan.fusions or plan its members alike.")
    if p.device == "cuda" and not torch.cuda.is_available():
        raise HardwareError("the plan puts the model on a CUDA GPU but this machine has none; "
                            "re-plan here with hetero_llm.plan(model) or use device='cpu'.")


def planned_model(model: nn.Module, p: Plan) -> nn.Module:
    """What the plan describes: the model itself, or (structured pruning) its pruned architecture."""
    cfg = prune_config(p)
    if cfg.method != "structured":
        return model
    spec = spec_by_family(p.family)
    return pruned_view(model, spec, plan_shrink(model, spec, cfg))


def _check_calibration_data(p: Plan, calibration_data: Any) -> None:
    """Before any change: refuse missing data a pass needs, and data no pass would use."""
    prune_needs, quant_needs = prune_config(p).needs_calibration, bool(calibrated_modules(p))
    if calibration_data is None and prune_needs:
        raise InvalidOptionError(
            "this pruning ranks weights by their calibration activations (Wanda) and needs calibration_data: "
            "a few tokenized text samples, e.g. [tokenizer(t, return_tensors='pt') for t in texts]. Or rank by "
            "weights alone: prune='magnitude', or PruneConfig(method='structured', criterion='magnitude').")
    if calibration_data is None and quant_needs:
        raise InvalidOptionError(
            "quantize='w8a8' with SmoothQuant smoothing (or outlier channels) needs calibration_data: a few "
            "tokenized text samples, e.g. [tokenizer(t, return_tensors='pt') for t in texts]. Or turn "
            "calibration off with QuantConfig(scheme='w8a8', smooth_alpha=0).")
    if calibration_data is not None and not (prune_needs or quant_needs):
        raise InvalidOptionError(
            "calibration_data is only used by quantize='w8a8' with smooth_alpha > 0 or outlier_channels > 0, "
            "and by prune='wanda' or structured pruning with criterion='wanda'; this plan needs no calibration. "
            "Drop calibration_data (or ask for one of those).")


def _already_accelerated(model: nn.Module, requested: Plan | None, options: dict) -> nn.Module:
    current: Plan = model.hetero_plan
    same = (requested is None and Options.from_kwargs(**options).to_dict() == current.options) \
        or (requested is not None and requested == current)
    if same:
        return model  # a repeated call with the same request is a no-op
    raise AlreadyAcceleratedError(
        "this model was already accelerated with a different plan; its weights are already converted. "
        "Load the original model again and call accelerate() once with the options you want.")


def _prepare(model: nn.Module, checkpoint: Any) -> None:
    on_meta = any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
    if checkpoint is not None:
        if not on_meta:
            raise InvalidOptionError(
                "checkpoint= fills a model built on the meta device (e.g. under accelerate.init_empty_weights()); "
                "this model already has its weights. Drop checkpoint=, or build the model without weights.")
        if model.training:
            model.eval()
        return
    if on_meta:
        raise MetaDeviceError(
            "the model's weights are on the meta device (no data), so they cannot be quantized or run. "
            "Load real weights first, or pass checkpoint=<safetensors directory> to read them (with tp/pp, "
            "each rank reads only its slice); hetero_llm.plan() works on meta models if you only need the plan.")
    _check_foreign_quantization(model)
    if model.training:
        warnings.warn("accelerate() switched the model to eval mode: INT8 and fused modules are for "
                      "inference and cannot be trained.", HeteroLLMWarning, stacklevel=3)
        model.eval()


def accelerate(model: nn.Module, *, plan: Plan | None = None, hardware: Hardware | str | None = None,
               calibration_data: Any = None, strict: bool = True, checkpoint: Any = None,
               **options: Any) -> nn.Module:
    """Plan (unless a plan is given) and apply it to `model` in place; returns the same object.

    The applied plan is attached as `model.hetero_plan`. Calling again with the
    same request is a no-op; with a different one it raises
    AlreadyAcceleratedError. `checkpoint`: a safetensors file or Hugging Face model
    directory to read the weights of a meta-device model from; with tp/pp > 1 (inside
    torchrun) each rank reads only its own slice.
    """
    _check_model(model)
    if hasattr(model, "hetero_plan"):
        return _already_accelerated(model, plan, options)
    if plan is not None and options:
        raise InvalidOptionError("pass either plan= or options, not both: a plan already holds its options.")
    _prepare(model, checkpoint)
    chosen = plan if plan is not None else _make_plan(model, _resolve_hardware(hardware),
                                                      Options.from_kwargs(**options), strict)
    job = None
    if chosen.parallel is not None:  # join the torchrun job before the first change; rank 0's plan wins
        job, chosen = join_job(chosen)
    # Before the first change: the swaps must reproduce transformers' modules on this install.
    chosen = verify_plan(model, chosen, strict=strict)
    check_plan_matches(planned_model(model, chosen), chosen)
    if checkpoint is not None:
        if prune_config(chosen).method != "none":
            raise InvalidOptionError(
                "pruning ranks weights over the whole model, which a meta model read slice by slice never holds. "
                "Load the full model on every rank and call accelerate(model, prune=..., tp=...) without "
                "checkpoint=: each rank prunes its copy with rank 0's statistics, then keeps its shard.")
        if calibration_data is not None or calibrated_modules(chosen):
            raise InvalidOptionError(
                "calibration (W8A8 smoothing or outlier channels) runs the whole model, which a meta model "
                "read slice by slice never is. Load the full model instead of checkpoint=, or use "
                "QuantConfig(scheme='w8a8', smooth_alpha=0) or quantize='int8'.")
    else:
        check_quantizable(model, chosen)  # fail before the first change, not halfway
        _check_calibration_data(chosen, calibration_data)
    return apply_plan(model, chosen, PassContext(calibration_data=calibration_data, job=job, checkpoint=checkpoint))
