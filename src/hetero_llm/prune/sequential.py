"""Layer-by-layer calibration: each decoder layer is measured on the outputs of the layers
before it *after* those were pruned, as Wanda's and SparseGPT's reference code do.

Statistics from the dense model alone ignore that pruning layer 3 changes what layer 4 sees;
measured sequentially, each layer's weights are ranked against the activations it will really
get. The cost is one forward pass over the calibration data: layer inputs are captured once at
the first decoder layer and carried from layer to layer.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.calibrate import calibration_batches, recording_hook


class _Captured(Exception):
    """Stops the model's forward once the first decoder layer's inputs are recorded."""


def _layer_inputs(model: nn.Module, first: nn.Module, data: Any) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first decoder layer's call, one per calibration batch."""
    calls: list[tuple[tuple, dict]] = []

    def catch(_module, args, kwargs):
        calls.append((args, dict(kwargs)))
        raise _Captured

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in calibration_batches(data):
            try:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return calls


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()  # not inference_mode: sliced weights made here must stay ordinary tensors
def prune_layer_by_layer(model: nn.Module, layers: nn.ModuleList, names_of_layer: Callable[[int], list[str]],
                         data: Any, prune_layer: Callable[[int, dict[str, torch.Tensor]], None], *,
                         statistic: str = "sum_of_squares", progress: bool = True) -> None:
    """For each decoder layer i: measure `statistic` ("sum_of_squares" per input channel, or the
    "gram" matrix X^T X) of the inputs of the modules `names_of_layer(i)` on the current
    activations, call `prune_layer(i, stats)`, then run the pruned layer to get the next
    layer's activations."""
    calls = _layer_inputs(model, layers[0], data)
    for i in tqdm(range(len(layers)), desc="pruning", unit="layer", disable=not progress):
        stats: dict[str, torch.Tensor] = {}
        handles = [model.get_submodule(n).register_forward_pre_hook(recording_hook(stats, n, statistic))
                   for n in names_of_layer(i)]
        try:
            for args, kwargs in calls:
                layers[i](*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        prune_layer(i, stats)
        calls = [_with_hidden(args, kwargs, _output(layers[i](*args, **kwargs))) for args, kwargs in calls]


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
