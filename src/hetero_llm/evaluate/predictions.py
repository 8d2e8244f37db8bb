"""Predicted vs measured decode speed, for every quantization option, on this machine.

`check_predictions` accelerates one model once per option, times greedy decode (runs of all
options interleaved, medians), and puts the planner's prediction beside each measurement. The
result (JSON) keeps the device costs and the model config it was predicted from, so that
`repredict` can recompute the predictions later with the current cost model: that is what
tests/planner/test_prediction_accuracy.py checks against the committed result.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import QuantConfig

TOLERANCE = 0.25
# option label -> accelerate() options; "original" is the model as transformers runs it.
OPTIONS: dict[str, dict[str, Any]] = {
    "original": {},
    "none": {"quantize": "none"},
    "int8 (auto)": {"quantize": "int8"},
    "int8-asym": {"quantize": "int8-asym"},
    "int8 per-group 128": {"quantize": QuantConfig(scheme="int8", granularity="group", group_size=128)},
    "w8a8": {"quantize": "w8a8"},
}


@dataclass
class PredictionCheck:
    model: str
    prompt_tokens: int
    new_tokens: int
    costs: dict  # the CPU DeviceCosts the predictions used
    config: dict  # the model's config, to rebuild it on the meta device
    measured_ms: dict[str, float] = field(default_factory=dict)  # per decoded token, median
    predicted_ms: dict[str, float] = field(default_factory=dict)

    def error(self, label: str) -> float:
        return self.predicted_ms[label] / self.measured_ms[label] - 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [f"{'option':<20} {'measured tok/s':>14} {'predicted tok/s':>15} {'error':>7}  within ±25%"]
        for label in self.measured_ms:
            m, p = self.measured_ms[label], self.predicted_ms[label]
            ok = "yes" if abs(self.error(label)) <= TOLERANCE else "NO"
            rows.append(f"{label:<20} {1e3 / m:>14.1f} {1e3 / p:>15.1f} {100 * self.error(label):>+6.1f}%  {ok}")
        return "\n".join(rows)


def option_kwargs(label: str, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """accelerate()/plan() options of one label, with the workload the timing uses."""
    return {**OPTIONS[label], "prompt_len": prompt_tokens + new_tokens // 2}


def predicted_ms(plan_fn, model, label: str, prompt_tokens: int, new_tokens: int) -> float:
    """The plan's decode prediction for one option ("original": the plan's 'before')."""
    if label == "original":
        p = plan_fn(model, **option_kwargs("none", prompt_tokens, new_tokens))
        return p.prediction.decode_ms_before
    return plan_fn(model, **option_kwargs(label, prompt_tokens, new_tokens)).prediction.decode_ms_after


def check_predictions(name: str = "smollm2", *, new_tokens: int = 32, repeats: int = 3,
                      labels: list[str] | None = None, progress: bool = True) -> PredictionCheck:
    """Measure decode ms/token for each option and predict it; see the module docstring."""
    from ..api import accelerate, plan
    from ..hardware import inspect_hardware
    from ..planner.cost import device_costs
    from .models import load_model
    from .perplexity import calibration_samples
    from .timing import chat_prompt_ids, measure_decode

    labels = labels or list(OPTIONS)
    base, tokenizer = load_model(name)
    ids = chat_prompt_ids(tokenizer)
    costs = device_costs(inspect_hardware(), "cpu")
    check = PredictionCheck(name, int(ids.shape[1]), new_tokens, costs.to_dict(), base.config.to_dict())
    models = {}
    for label in labels:
        model = load_model(name)[0]
        if label != "original":
            kwargs = option_kwargs(label, check.prompt_tokens, new_tokens)
            cal = calibration_samples(tokenizer, n=8, seq_len=128) if kwargs.get("quantize") == "w8a8" else None
            model = accelerate(model, calibration_data=cal, **kwargs)
        models[label] = model
        check.predicted_ms[label] = predicted_ms(plan, base, label, check.prompt_tokens, new_tokens)
    for model in models.values():
        measure_decode(model, ids, 4)  # warm-up
    runs: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        for label, model in models.items():
            runs[label].append(measure_decode(model, ids, new_tokens) * 1e3 / new_tokens)
        if progress:
            print(f"round {r + 1}/{repeats} done", flush=True)
    check.measured_ms = {label: statistics.median(v) for label, v in runs.items()}
    return check


def repredict(check: dict) -> dict[str, float]:
    """Predictions for a stored check, from its stored costs and config, with today's cost model."""
    from unittest import mock

    from transformers import AutoConfig, AutoModelForCausalLM

    from ..api import plan
    from ..hardware import inspect_hardware
    from ..planner import cost
    from ..planner.measure import DeviceCosts

    costs = DeviceCosts.from_dict(check["costs"])
    config = AutoConfig.for_model(**{k: v for k, v in check["config"].items() if k != "model_type"},
                                  model_type=check["config"]["model_type"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with mock.patch.object(cost, "device_costs", lambda hardware, device: costs):
        hw = inspect_hardware()
        return {label: predicted_ms(lambda m, **kw: plan(m, hardware=hw, **kw), model, label,
                                    check["prompt_tokens"], check["new_tokens"])
                for label in check["measured_ms"]}
