"""Measurements of one variant: weight bytes, peak RSS, decode and prefill time.

Each function measures one thing once; repetition, interleaving and medians are
the job of :mod:`hetero_llm.evaluate.bench`.
"""
from __future__ import annotations

import inspect
import threading
import time

import torch

from ..errors import HeteroLLMError, InvalidOptionError
from .perplexity import default_text

CHAT_PROMPT = "Explain in a few sentences why the sky is blue."


def _storage_key(t: torch.Tensor):
    # Meta tensors all report data_ptr 0, so they are keyed by identity instead.
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.untyped_storage().data_ptr())


def _storage_bytes(t: torch.Tensor) -> int:
    if t.device.type == "meta":
        return t.numel() * t.element_size()
    return t.untyped_storage().nbytes()


def _packed_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Weight and bias hidden inside a torch.ao dynamic-quantized module, if any.

    ``quantize_dynamic`` stores its int8 weight in an opaque packed object that is
    neither a parameter nor a buffer, so it has to be unpacked to be counted.
    """
    packed = getattr(module, "_packed_params", None)
    # Only the outer module (e.g. dynamic Linear) holds a LinearPackedParams module;
    # the inner ``_packed_params`` of that one is a ScriptObject we skip.
    if not isinstance(packed, torch.nn.Module) or not hasattr(packed, "_weight_bias"):
        return []
    weight, bias = packed._weight_bias()
    return [t for t in (weight, bias) if isinstance(t, torch.Tensor)]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by all parameters and buffers, each shared storage counted once.

    Tied weights (embeddings and lm_head) count once; int8 buffers count at one
    byte per element; torch.ao dynamic-quantized Linear weights are unpacked and counted.
    A model whose weights live outside torch (``OnnxCausalLM``) says itself, through
    ``weight_bytes()``.
    """
    own = getattr(model, "weight_bytes", None)
    if callable(own):
        return int(own())
    seen: set = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors.extend(_packed_tensors(module))
    for t in tensors:
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += _storage_bytes(t)
    return total


class PeakRSS:
    """Context manager that samples this process's RSS on a daemon thread.

    After the block, ``start_bytes`` is the RSS on entry, ``peak_bytes`` the largest
    sample seen, and ``delta_bytes`` their difference (what the block added at peak).
    """

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_bytes = 0
        self.peak_bytes = 0

    @property
    def delta_bytes(self) -> int:
        """Peak RSS minus RSS on entry, in bytes."""
        return max(0, self.peak_bytes - self.start_bytes)

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self.peak_bytes = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakRSS", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()  # catch a peak that is still resident at exit


def _pad_token_id(model) -> int:
    cfg = getattr(model, "generation_config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0  # any id works: the batch has one row, so nothing is ever padded


def measure_decode(model, input_ids: torch.Tensor, new_tokens: int = 64) -> float:
    """Seconds for greedy ``generate`` of exactly ``new_tokens`` tokens after ``input_ids``."""
    if new_tokens < 1:
        raise InvalidOptionError(f"new_tokens must be at least 1, got {new_tokens}")
    attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=_pad_token_id(model),
        )
        elapsed = time.perf_counter() - start
    grown = out.shape[-1] - input_ids.shape[-1]
    if grown != new_tokens:
        raise HeteroLLMError(
            f"generate produced {grown} new tokens instead of {new_tokens}; the timing "
            "would not be comparable (check the model's generation_config)"
        )
    return elapsed


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def measure_prefill(model, input_ids: torch.Tensor) -> float:
    """Seconds for one forward over the whole prompt, without a KV cache.

    Only the last position's logits are asked for when the model allows it, as
    generate does, so the vocabulary projection does not dominate the timing.
    """
    kwargs = {"use_cache": False}
    if _accepts(model.forward, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=input_ids, **kwargs)
        return time.perf_counter() - start


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """A deterministic ``(1, length)`` LongTensor cut from :func:`default_text`."""
    if length < 1:
        raise InvalidOptionError(f"prompt length must be at least 1 token, got {length}")
    text = default_text()
    # Tokenizing the whole 113k-token corpus is slow, so a prefix is tokenized and
    # doubled until it gives more than `length` tokens: the last token, which may
    # be a word cut in half by the character slice, is then never kept.
    chars = length * 8 + 256
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > length or chars >= len(text):
            break
        chars *= 2
    if len(ids) < length:
        raise InvalidOptionError(
            f"the default text gives only {len(ids)} tokens; ask for a shorter prompt"
        )
    return torch.tensor([ids[:length]], dtype=torch.long)


def chat_prompt_ids(tokenizer) -> torch.Tensor:
    """A short fixed natural-language prompt, ``(1, n)``, for decode timing."""
    return tokenizer(CHAT_PROMPT, return_tensors="pt")["input_ids"].to(torch.long)
