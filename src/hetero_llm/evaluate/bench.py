"""Interleaved before/after benchmark of several variants of one model.

Variants are measured round-robin, with the starting variant rotated each round,
so thermal drift, frequency scaling and background noise hit all of them alike.
Medians, not means, summarize the runs because one preempted run should not move them.
"""
from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict, dataclass, field

import torch

from ..errors import InvalidOptionError
from .agreement import AGREEMENT_TOKENS, agreement, greedy_tokens
from .perplexity import model_device, perplexity
from .timing import (
    PeakRSS,
    chat_prompt_ids,
    measure_decode,
    measure_prefill,
    prompt_ids,
    weight_bytes,
)

_MB = 1e6
METRICS = ("decode_tok_s", "prefill_tok_s", "weight_mb", "peak_rss_delta_mb", "perplexity")
PPL_WINDOW = 512
_WARMUP_TOKENS = 8  # a short generate is enough to trigger lazy init and allocator growth


@dataclass
class VariantResult:
    """Measurements of one variant.

    ``decode_runs`` and ``prefill_runs`` hold tokens per second of each round;
    ``decode_tok_s`` and ``prefill_tok_s`` are their medians. ``peak_rss_delta_mb`` is
    the largest RSS growth seen during any one of its runs (KV cache, activations,
    workspaces), not the weights, which were resident before.
    """

    name: str
    decode_tok_s: float
    prefill_tok_s: float
    decode_runs: list[float]
    prefill_runs: list[float]
    weight_mb: float
    peak_rss_delta_mb: float
    perplexity: float | None
    # Greedy tokens on the decode prompt against the baseline's (evaluate.agreement): the speed of a
    # variant whose output is not the original's is no speedup. None when not measured.
    tokens_identical: bool | None = None
    token_agreement: float | None = None
    first_difference: int | None = None
    accuracy_failure: str | None = None  # set by the caller that knows the variant's bar


@dataclass
class BenchResult:
    """All variants of one benchmark, the settings used, and the baseline's name."""

    model: str
    variants: list[VariantResult]
    settings: dict = field(default_factory=dict)
    baseline: str = ""

    def __post_init__(self):
        if not self.baseline and self.variants:
            self.baseline = self.variants[0].name

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        """The result as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> BenchResult:
        """Inverse of :meth:`to_dict`."""
        variants = [VariantResult(**v) for v in data["variants"]]
        return cls(data["model"], variants, dict(data.get("settings", {})), data.get("baseline", ""))

    def variant(self, name: str) -> VariantResult:
        """The variant called ``name``."""
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise InvalidOptionError(f"no variant named {name!r}; this result has: {known}")

    def ratio(self, name: str, metric: str, against: str | None = None) -> float | None:
        """``metric`` of ``name`` divided by that of ``against`` (default: the baseline).

        Returns None when either value is missing (perplexity skipped) or the
        denominator is zero.
        """
        if metric not in METRICS:
            raise InvalidOptionError(f"unknown metric {metric!r}; choose one of {METRICS}")
        num = getattr(self.variant(name), metric)
        den = getattr(self.variant(against or self.baseline), metric)
        if num is None or den is None or den == 0:
            return None
        return num / den


def _settings(repeats, new_tokens, prompt_len, warmup, ppl_tokens) -> dict:
    import transformers

    return {
        "repeats": repeats,
        "new_tokens": new_tokens,
        "prompt_len": prompt_len,
        "warmup": warmup,
        "ppl_tokens": ppl_tokens,
        "ppl_window": PPL_WINDOW,
        "agreement_tokens": AGREEMENT_TOKENS,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _validate(variants, repeats, new_tokens, prompt_len, warmup) -> None:
    if not variants:
        raise InvalidOptionError("run_bench needs at least one variant")
    for name, value, low in (
        ("repeats", repeats, 1),
        ("new_tokens", new_tokens, 1),
        ("prompt_len", prompt_len, 1),
        ("warmup", warmup, 0),
    ):
        if value < low:
            raise InvalidOptionError(f"{name} must be at least {low}, got {value}")


class _Runs:
    """Raw per-variant timings and RSS peaks, filled in while the rounds interleave."""

    def __init__(self, names):
        self.decode = {n: [] for n in names}
        self.prefill = {n: [] for n in names}
        self.rss = dict.fromkeys(names, 0)

    def record(self, name: str, kind: str, tok_s: float, rss: PeakRSS) -> None:
        getattr(self, kind)[name].append(tok_s)
        self.rss[name] = max(self.rss[name], rss.delta_bytes)


def _inputs(variants, tokenizer, prompt_len):
    """Per-variant (decode prompt, prefill prompt), moved to each variant's device."""
    chat, prompt = chat_prompt_ids(tokenizer), prompt_ids(tokenizer, prompt_len)
    out = {}
    for name, model in variants.items():
        device = model_device(model)
        out[name] = (chat.to(device), prompt.to(device))
    return out


def _warm_up(variants, inputs, warmup, new_tokens, bar) -> None:
    for name, model in variants.items():
        chat, prompt = inputs[name]
        for _ in range(warmup):
            bar.set_postfix_str(f"{name} warmup")
            measure_decode(model, chat, min(new_tokens, _WARMUP_TOKENS))
            measure_prefill(model, prompt)
            bar.update()


def _agreements(variants, inputs, new_tokens: int) -> dict:
    """Each variant's greedy tokens on the decode prompt against the baseline's (the first)."""
    names = list(variants)
    reference = greedy_tokens(variants[names[0]], inputs[names[0]][0], new_tokens)
    return {name: agreement(variants[name], inputs[name][0], reference) for name in names[1:]}


def _summarize(name, model, runs: _Runs, ppl: float | None, agreed=None) -> VariantResult:
    return VariantResult(
        tokens_identical=True if agreed is None else agreed.identical,
        token_agreement=1.0 if agreed is None else agreed.agreement,
        first_difference=None if agreed is None else agreed.first_difference,
        name=name,
        decode_tok_s=statistics.median(runs.decode[name]),
        prefill_tok_s=statistics.median(runs.prefill[name]),
        decode_runs=runs.decode[name],
        prefill_runs=runs.prefill[name],
        weight_mb=weight_bytes(model) / _MB,
        peak_rss_delta_mb=runs.rss[name] / _MB,
        perplexity=ppl,
    )


def _measure_round(variants, inputs, order, new_tokens, runs, bar) -> None:
    for name in order:
        model, (chat, prompt) = variants[name], inputs[name]
        bar.set_postfix_str(f"{name} decode")
        with PeakRSS() as rss:
            seconds = measure_decode(model, chat, new_tokens)
        runs.record(name, "decode", new_tokens / seconds, rss)
        bar.update()
        bar.set_postfix_str(f"{name} prefill")
        with PeakRSS() as rss:
            seconds = measure_prefill(model, prompt)
        runs.record(name, "prefill", prompt.shape[-1] / seconds, rss)
        bar.update()


def run_bench(
    variants: dict,
    tokenizer,
    *,
    repeats: int = 5,
    new_tokens: int = 64,
    prompt_len: int = 512,
    warmup: int = 1,
    perplexity_tokens: int | None = 8192,
    progress: bool = True,
    model_name: str = "",
) -> BenchResult:
    """Measure every variant interleaved and return medians, sizes and perplexity.

    ``variants`` maps a display name to a model; the first one is the baseline that
    ratios are taken against. Each round measures every variant's decode (greedy
    ``new_tokens`` after a short chat prompt) and prefill (``prompt_len`` tokens),
    starting at variant ``r % n`` in round ``r``. ``perplexity_tokens`` of 0 or None
    skips perplexity.
    """
    from tqdm.auto import tqdm

    _validate(variants, repeats, new_tokens, prompt_len, warmup)
    names = list(variants)
    inputs = _inputs(variants, tokenizer, prompt_len)
    do_ppl = bool(perplexity_tokens)
    total = len(names) * (warmup + 2 * repeats + int(do_ppl))
    runs = _Runs(names)
    ppl: dict[str, float | None] = dict.fromkeys(names)
    with tqdm(total=total, desc="bench", unit="run", disable=not progress) as bar:
        _warm_up(variants, inputs, warmup, new_tokens, bar)
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            _measure_round(variants, inputs, order, new_tokens, runs, bar)
        bar.set_postfix_str("token agreement")
        agreed = _agreements(variants, inputs, AGREEMENT_TOKENS)
        for name in names if do_ppl else ():
            bar.set_postfix_str(f"{name} perplexity")
            ppl[name] = perplexity(
                variants[name], tokenizer, max_tokens=perplexity_tokens,
                window=PPL_WINDOW, progress=False,
            ).perplexity
            bar.update()
    results = [_summarize(name, variants[name], runs, ppl[name], agreed.get(name)) for name in names]
    settings = _settings(repeats, new_tokens, prompt_len, warmup, perplexity_tokens or None)
    return BenchResult(model=model_name, variants=results, settings=settings, baseline=names[0])
