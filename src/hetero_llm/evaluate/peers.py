"""Peers: what a user would reach for instead of hetero_llm, measured in the same run."""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch


def torch_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` with every ``nn.Linear`` made int8 by ``quantize_dynamic``.

    This is what a CPU user would otherwise pick: one built-in call, int8 weights,
    fbgemm/qnnpack matmuls. It quantizes activations per tensor at run time, so a few
    outlier channels stretch the scale for all the others, which is why its
    perplexity suffers on SmolLM2. The original model is left untouched.
    """
    quantized = copy.deepcopy(model)
    # torch.ao.quantization warns that it is deprecated on every call, and the
    # quantized-tensor constructors warn again; the user asked for this peer on
    # purpose, so the noise is silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(quantized, {torch.nn.Linear}, dtype=torch.qint8)
    quantized.eval()
    return quantized


PEERS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "torch-dynamic-int8": torch_dynamic_int8,
}
"""Peer name -> function building that peer from an fp32 model (a new object)."""
