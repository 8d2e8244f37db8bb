"""How generate() decodes: hetero_llm's static-cache step (captured as a CUDA graph on a GPU)
or transformers' own loop. The planner's choice; `hetero_llm.decode` applies it."""
from __future__ import annotations

from torch import nn

from ..config import Options
from ..errors import InvalidOptionError
from ..integrations.transformers import ArchitectureSpec
from .plan import Fusion

# Modes by device under decode="auto". On the CPU the static step measured 0.93-0.97x
# transformers' loop (SmolLM2-135M INT8, 2 cores): a CPU decode step is dominated by its
# matmuls, and the static cache's index_copy costs what the skipped mask saves.
AUTO = {"cuda": "cuda_graph", "cpu": "transformers"}

REASONS = {
    "cuda_graph": "decode: static KV cache; each step is one CUDA-graph replay of hetero_llm's decode step "
                  "(captured at the first generate() of each batch size and cache length)",
    "static": "decode: static KV cache and hetero_llm's decode step (no per-token mask, split-KV attention "
              "over the filled cache)",
}


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
                  fusions: list[Fusion], multi_device: bool) -> tuple[str, str]:
    """(mode, the plan's note): "cuda_graph", "static" or "transformers"."""
    asked = options.kernels.decode
    if asked == "transformers":
        return "transformers", "decode: transformers' generate loop (decode='transformers')"
    if asked == "cuda_graph" and device != "cuda":
        raise InvalidOptionError("decode='cuda_graph' captures CUDA graphs and needs the model on a CUDA GPU; "
                                 "use decode='static' (the same step, eager) or 'auto' on this device.")
    problem = _problem(model, spec, fusions, multi_device)
    if problem is not None:
        if asked != "auto":
            raise InvalidOptionError(f"decode={asked!r} cannot run this model: {problem}. "
                                     "Use decode='auto' or 'transformers'.")
        return "transformers", f"decode: transformers' generate loop ({problem})"
    mode = AUTO.get(device, "transformers") if asked == "auto" else asked
    return mode, REASONS.get(mode, f"decode: transformers' generate loop (measured faster on {device})")
