"""The decode pass: installs the plan's decode mode on the model (see decode.runner)."""
from __future__ import annotations

import warnings

from torch import nn

from ..errors import HeteroLLMWarning, PlanMismatchError
from ..integrations.transformers import spec_by_family
from ..plan import Plan
from .runner import install
from .step import step_problem


def decode_pass(model: nn.Module, plan: Plan) -> list[tuple[str, str, str]]:
    mode = plan.model_settings.get("decode", "transformers")  # plans saved before it existed: unchanged
    if mode == "transformers":
        return []
    spec = spec_by_family(plan.family)
    problem = step_problem(model, spec)
    if problem is not None:
        raise PlanMismatchError(f"the plan decodes with decode={mode!r}, but {problem}. Make the plan from this "
                                "model (hetero_llm.plan(model)) or plan with decode='transformers'.")
    if mode == "native":
        from .native import native_problem

        problem = native_problem(model, spec)
        if problem is not None:  # same tokens either way: decode with transformers' loop, say why
            warnings.warn(f"hetero_llm: the native CPU decode step cannot run this model ({problem}); "
                          "generate() uses transformers' loop.", HeteroLLMWarning, stacklevel=3)
            return []
    install(model, spec, mode)
    return [("generate", type(model).__name__, f"generate() with decode={mode}")]
