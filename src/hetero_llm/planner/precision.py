"""The dtype a CPU plan computes activations in.

transformers 5 keeps a checkpoint's dtype, so most models arrive in bf16. Once the linears are
INT8, the bf16 left is the activations (and norms, biases, the KV cache): on a CPU without
AVX-512 BF16 every bf16 op is emulated, and even with it the measured fp32 paths were faster
(SmolLM2-135M on AMD Zen 4 with BF16: prompt 765 tok/s from bf16 vs ~870 from fp32; decode 52
vs 69 tok/s under transformers' loop), and hetero_llm's native CPU decode step is fp32. So a
CPU plan with INT8 weights computes in fp32 whatever the checkpoint's dtype; the cast comes
after quantization, so it touches only the small tensors left in float.
"""
from __future__ import annotations

import torch
from torch import nn

from .._modules import model_dtype
from ..plan import PlanEntry

LOW_PRECISION = (torch.bfloat16, torch.float16)


def choose_compute_dtype(model: nn.Module, device: str, entries: list[PlanEntry]) -> tuple[str | None, str | None]:
    """("float32", the plan's note) for a bf16/fp16 model planned on a CPU with INT8 weight-only
    linears; (None, None) when the model keeps its own dtype."""
    dtype = model_dtype(model)
    if device != "cpu" or dtype not in LOW_PRECISION:
        return None, None
    if not any(e.action == "quantize" and (e.quant or "").startswith("int8") for e in entries):
        return None, None
    name = str(dtype).replace("torch.", "")
    return "float32", (f"activations: float32, not the model's {name}: INT8 weights times fp32 activations "
                       "measured faster on CPUs than in bf16 (emulated without AVX-512 BF16), and the native "
                       "decode step is fp32; norms, biases and the KV cache become fp32")
