"""Calibration for W8A8: per-input-channel activation maxima, SmoothQuant factors, outliers.

A handful of tokenized text samples are run through the floating-point model
once; a pre-forward hook on each linear to be quantized records max |x| per
input channel. From those:
  smoothing  s_j = max|x_j|^alpha / max|w_j|^(1 - alpha), and the layer computes
             (x / s) (W s)^T: activation outliers move into the weight,
             where per-output-channel scales absorb them (SmoothQuant).
  outliers   the input channels whose smoothed activations are still largest
             stay in floating point (LLM.int8()-style), if asked for.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidOptionError

# Channels whose activation or weight maximum is ~0 carry no signal: leave them unscaled.
_EPS = 1e-5


def calibration_batches(data: Any) -> list[dict[str, torch.Tensor]]:
    """Normalize calibration_data to a list of model inputs ({"input_ids": (1|B, S), ...})."""
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    if isinstance(data, str) or not isinstance(data, Iterable):
        raise InvalidOptionError(
            "calibration_data must be token ids: a LongTensor (batch, seq), a list of them, or tokenizer "
            "outputs (dicts with input_ids). Tokenize text first, e.g. "
            "[tokenizer(t, return_tensors='pt') for t in texts].")
    batches = []
    for item in data:
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise InvalidOptionError(
                f"calibration_data holds a {type(item).__name__}; each sample must be a LongTensor of token ids "
                "or a tokenizer output with input_ids. Tokenize text with the model's tokenizer first.")
        ids = item["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.numel() == 0:
            raise InvalidOptionError(
                f"calibration input_ids must be a non-empty integer tensor of token ids, got "
                f"{getattr(ids, 'dtype', type(ids).__name__)}. Tokenize text with the model's tokenizer and "
                "return_tensors='pt', e.g. tokenizer(t, return_tensors='pt').")
        batch = {k: v for k, v in item.items() if k in ("input_ids", "attention_mask")}
        batch["input_ids"] = ids if ids.dim() == 2 else ids.reshape(1, -1)
        if "attention_mask" in batch and batch["attention_mask"].dim() == 1:
            batch["attention_mask"] = batch["attention_mask"].reshape(1, -1)
        batches.append(batch)
    if not batches:
        raise InvalidOptionError("calibration_data is empty; pass a few (8-32) tokenized text samples.")
    return batches


def _absmax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=0).float()


def _sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).sum(dim=0)


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x.t() @ x


# How each statistic folds one batch of inputs (tokens, channels) into the running value.
# "gram" is X^T X (channels x channels); its diagonal is the sum of squares.
STATISTICS = {"absmax": (_absmax, torch.maximum), "sum_of_squares": (_sum_of_squares, torch.add),
              "gram": (_gram, torch.add)}


def recording_hook(stats: dict[str, torch.Tensor], name: str, statistic: str):
    """A forward pre-hook folding `statistic` of the module's input into stats[name]."""
    reduce_batch, combine = STATISTICS[statistic]

    def record(_module, args):
        x = args[0].detach()
        value = reduce_batch(x.reshape(-1, x.shape[-1])).cpu()
        stats[name] = value if name not in stats else combine(stats[name], value)
    return record


@torch.inference_mode()
def activation_stats(model: nn.Module, names: list[str], data: Any, statistic: str, *,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """A per-input-channel statistic (fp32, on CPU) of what each named module reads over the samples:
    "absmax" (max |x|, for SmoothQuant) or "sum_of_squares" (sum of x^2, whose root is Wanda's ||x||)."""
    stats: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(recording_hook(stats, n, statistic)) for n in names]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(calibration_batches(data), desc="calibrating", unit="sample", disable=not progress):
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in stats]
    if missing:
        raise InvalidOptionError(f"calibration never reached {missing[0]} ({len(missing)} modules in all); "
                                 "the samples must run through the whole model.")
    return stats


def activation_absmax(model: nn.Module, names: list[str], data: Any, *,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """max |x| per input channel (fp32, on CPU) seen by each named module over the samples."""
    return activation_stats(model, names, data, "absmax", progress=progress)


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s per input channel; the layer multiplies x by 1/s and W by s."""
    a = act_absmax.float().clamp(min=_EPS)
    w = weight_absmax.float().clamp(min=_EPS)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    dead = (act_absmax <= _EPS) | (weight_absmax <= _EPS)
    return torch.where(dead | ~torch.isfinite(s), torch.ones_like(s), s).clamp(min=1e-4, max=1e4)


def outlier_channels(smoothed_absmax: torch.Tensor, count: int) -> torch.Tensor | None:
    """Indices (sorted) of the `count` input channels with the largest activations."""
    if count <= 0:
        return None
    count = min(count, smoothed_absmax.numel())
    return torch.topk(smoothed_absmax.float(), count).indices.sort().values
