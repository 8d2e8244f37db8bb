"""The place pass: put the model on the device the plan chose."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import HardwareError
from ..planner.plan import Plan


def place_pass(model: nn.Module, plan: Plan) -> None:
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise HardwareError("the plan puts the model on a CUDA GPU but this machine has none; "
                            "re-plan here with hetero_llm.plan(model) or use device='cpu'.")
    current = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if current != {plan.device}:
        model.to(plan.device)
