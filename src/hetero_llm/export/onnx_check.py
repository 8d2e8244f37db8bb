"""The export's self-check: the written file, run by onnxruntime, against the traced model."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError, HeteroLLMWarning
from ..integrations.hf_adapter import cache_argument, cache_from_pairs, cache_pairs, output_cache

# Relative to the largest |logit|: fp32 torch vs fp32 ONNX Runtime differ by float rounding
# (~1e-6 relative); a wrong graph differs by O(1). The check catches the latter only.
CHECK_RTOL = 1e-3


def _reference(clone: nn.Module, ids: torch.Tensor, past=None):
    total = ids.shape[1] + (0 if past is None else past[0][0].shape[2])
    mask = torch.ones(ids.shape[0], total, dtype=torch.long)
    with torch.inference_mode():
        out = type(clone).forward(clone, input_ids=ids, attention_mask=mask, use_cache=True,
                                  **{cache_argument(clone): cache_from_pairs(past)})
    return out.logits.float(), cache_pairs(output_cache(out))


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| (1 if b is all zeros)."""
    scale = max(float(b.abs().max()), 1e-30) if b.numel() else 1.0
    return float((a.float() - b.float()).abs().max()) / scale


def check_export(clone: nn.Module, directory: Path) -> float | None:
    """Prompt of 5 tokens, then one cached step: raise ExportError if ORT's logits are off.
    Returns the larger relative difference, or None (with a warning) without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        warnings.warn("onnxruntime is not installed, so the ONNX file was not checked "
                      "(pip install onnxruntime; or pass check=False).", HeteroLLMWarning, stacklevel=3)
        return None
    from .onnx_runtime import OnnxCausalLM

    runner = OnnxCausalLM(directory, matmul="float")
    vocab = int(runner.meta["vocab_size"])
    ids = torch.arange(5).reshape(1, 5) * 7 % vocab
    step = torch.tensor([[11 % vocab]])
    want, past = _reference(clone, ids)
    got = runner(input_ids=ids)
    want2, _ = _reference(clone, step, past)
    got2 = runner(input_ids=step, past_key_values=output_cache(got))
    worst = max(max_relative_difference(got.logits, want), max_relative_difference(got2.logits, want2))
    if not worst <= CHECK_RTOL:
        raise ExportError(f"the exported graph's logits differ from the model's by {worst:.2e} of their range "
                          f"(float rounding gives ~1e-6): the export is wrong for this model. Please report it "
                          "with the model's config; check=False writes it anyway.")
    return worst
