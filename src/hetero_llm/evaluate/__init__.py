"""Measuring machinery: models, perplexity, decode/prefill timing, peers, reports.

``hetero-llm bench`` builds variants of one model, hands them to :func:`run_bench`,
and prints :func:`format_table` of the result.
"""
from __future__ import annotations

from .bench import BenchResult, VariantResult, run_bench
from .models import cache_dir, load_model, smollm2_dir, smollm2_gguf
from .peers import PEERS, torch_dynamic_int8
from .perplexity import PerplexityResult, calibration_samples, default_text, perplexity
from .report import format_table, save_chart, save_json
from .timing import (
    PeakRSS,
    chat_prompt_ids,
    measure_decode,
    measure_prefill,
    prompt_ids,
    weight_bytes,
)

__all__ = [
    "PEERS",
    "BenchResult",
    "PeakRSS",
    "PerplexityResult",
    "VariantResult",
    "cache_dir",
    "calibration_samples",
    "chat_prompt_ids",
    "default_text",
    "format_table",
    "load_model",
    "measure_decode",
    "measure_prefill",
    "perplexity",
    "prompt_ids",
    "run_bench",
    "save_chart",
    "save_json",
    "smollm2_dir",
    "smollm2_gguf",
    "torch_dynamic_int8",
    "weight_bytes",
]
