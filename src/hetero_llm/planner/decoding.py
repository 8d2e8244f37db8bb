"""How generate() decodes: hetero_llm's static-cache step (captured as a CUDA graph on a GPU)
or transformers' own loop. The planner's choice; `hetero_llm.decode` applies it."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Options
from ..errors import InvalidOptionError
from ..integrations.transformers import ArchitectureSpec
from ..plan import Fusion, PlanEntry
from .._modules import model_dtype

# Modes by device under decode="auto". On the CPU the eager static step measured 0.93-0.97x
# transformers' loop (SmolLM2-135M INT8, 2 cores: its ~1,000 small ops cost what the skipped mask
# saves), so the CPU gets the native step where it applies and transformers' loop otherwise.
AUTO = {"cuda": "cuda_graph", "cpu": "native"}
# The linears of a layer the native step multiplies: all must be symmetric per-channel INT8.
NATIVE_ROLES = ("q", "k", "v", "o", "gate", "up", "down")

REASONS = {
    "cuda_graph": "decode: static KV cache; each step is one CUDA-graph replay of hetero_llm's decode step "
                  "(captured at the first generate() of each batch size and cache length)",
    "static": "decode: static KV cache and hetero_llm's decode step (no per-token mask, split-KV attention "
              "over the filled cache)",
    "native": "decode: static KV cache; every decoder layer of a step in one compiled CPU call "
              "(INT8 GEMVs, rotary, attention, norms; hetero_llm.decode.native)",
}


def _native_problem(model: nn.Module, spec: ArchitectureSpec, entries: list[PlanEntry], isa,
                    compute_dtype: str | None) -> str | None:
    """Why the plan cannot decode with the native CPU step (decode.native) on a CPU with instruction
    sets `isa`, or None. Installing the step checks the modules again and builds it (a compiler and
    ninja are needed then); this is what the plan alone can tell."""
    from ..kernels import cpu_decode

    dtype = getattr(torch, compute_dtype) if compute_dtype else model_dtype(model)
    if dtype != torch.float32:
        return f"the model computes in {dtype} (the native step is fp32)"
    if "q_norm" in spec.roles:
        return "its attention normalizes q and k per head (the native step does not)"
    build = cpu_decode.best_isa(isa)
    if build is None:
        return "no native CPU decode step for this CPU (it needs AVX2 or AVX-512 VNNI; or HETERO_LLM_CPU_ISA=none)"
    multiple = cpu_decode.K_MULTIPLE[build]
    by_name = {e.name: e for e in entries}
    for index in range(len(model.get_submodule(spec.layers))):
        for role in NATIVE_ROLES:
            name = f"{spec.layers}.{index}.{spec.roles[role]}"
            entry = by_name.get(name)
            if entry is None or entry.action != "quantize" or entry.quant != "int8":
                return f"{name} is not symmetric per-channel INT8 weight-only ({entry.quant if entry else 'absent'})"
            if model.get_submodule(name).in_features % multiple:
                return f"{name}'s inputs are not a multiple of {multiple}"
        for role in ("attn_norm", "mlp_norm"):
            entry = by_name.get(f"{spec.layers}.{index}.{spec.roles[role]}")
            if entry is None or entry.action != "swap":
                return "the RMSNorms are not swapped (KernelConfig(fuse_norms=False)?)"
    act = getattr(model.get_submodule(f"{spec.layers}.0.{spec.roles['mlp']}"), "act_fn", None)
    if act is None or cpu_decode.activation_code(act) is None:
        return f"its MLP activation ({type(act).__name__}) is not SiLU or tanh-GELU"
    return None


def _problem(model: nn.Module, spec: ArchitectureSpec | None, fusions: list[Fusion], multi_device: bool) -> str | None:
    from ..decode.step import static_cache_problem

    if multi_device:
        return "the model is split over devices or ranks"
    if spec is None or spec.attention_style != "rotary" or not spec.rotary_embedding:
        return f"the {spec.family if spec else 'unknown'} family has no Llama-style decode step"
    layers = len(model.get_submodule(spec.layers))
    fused = {f.name for f in fusions if f.kind == "rotary_attention"}
    if any(f"{spec.layers}.{i}.{spec.roles['attention']}" not in fused for i in range(layers)):
        return "not every layer's attention is fused (KernelConfig(fuse_projections=False)?)"
    return static_cache_problem(model.config)


def choose_decode(model: nn.Module, spec: ArchitectureSpec | None, options: Options, device: str,
                  fusions: list[Fusion], multi_device: bool, entries: list[PlanEntry] = (),
                  cpu_isa: tuple[str, ...] = (), compute_dtype: str | None = None) -> tuple[str, str]:
    """(mode, the plan's note): "cuda_graph", "static", "native" or "transformers"."""
    asked = options.kernels.decode
    if asked == "transformers":
        return "transformers", "decode: transformers' generate loop (decode='transformers')"
    if asked == "cuda_graph" and device != "cuda":
        raise InvalidOptionError("decode='cuda_graph' captures CUDA graphs and needs the model on a CUDA GPU; "
                                 "use decode='static' (the same step, eager) or 'auto' on this device.")
    if asked == "native" and device != "cpu":
        raise InvalidOptionError("decode='native' is the compiled CPU decode step and needs the model on the "
                                 "CPU; use decode='auto' on this device.")
    problem = _problem(model, spec, fusions, multi_device)
    if problem is None and device == "cpu" and asked in ("auto", "native"):
        problem = _native_problem(model, spec, list(entries), cpu_isa, compute_dtype)
    if problem is not None:
        if asked != "auto":
            raise InvalidOptionError(f"decode={asked!r} cannot run this model: {problem}. "
                                     "Use decode='auto' or 'transformers'.")
        return "transformers", f"decode: transformers' generate loop ({problem})"
    mode = AUTO.get(device, "transformers") if asked == "auto" else asked
    return mode, REASONS.get(mode, f"decode: transformers' generate loop (measured faster on {device})")
