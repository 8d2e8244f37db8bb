"""Small helpers about a model's modules: find and replace them by dotted name, the dtype of its
weights."""
from __future__ import annotations

import torch
from torch import nn


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` was; returns the old module."""
    parent, attr = parent_of(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old
