"""Predicted vs measured decode and prompt speed, for every quantization option, on this machine.

`check_predictions` accelerates one model once per option, times greedy decode and one prompt
(runs of all options interleaved, medians), and puts the planner's predictions beside each
measurement. The
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
from ..errors import InvalidOptionError

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
    prefill_tokens: int = 0  # the timed prompt's length (0: prompts were not timed)
    measured_prefill_ms: dict[str, float] = field(default_factory=dict)  # one prompt, median
    predicted_prefill_ms: dict[str, float] = field(default_factory=dict)

    def error(self, label: str) -> float:
        return self.predicted_ms[label] / self.measured_ms[label] - 1.0

    def prefill_error(self, label: str) -> float:
        return self.predicted_prefill_ms[label] / self.measured_prefill_ms[label] - 1.0

    def errors(self) -> dict[str, float]:
        """"decode <label>" / "prefill <label>" -> relative error of the prediction."""
        out = {f"decode {label}": self.error(label) for label in self.measured_ms}
        out.update({f"prefill {label}": self.prefill_error(label) for label in self.measured_prefill_ms})
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [f"{'phase':<8} {'option':<20} {'measured tok/s':>14} {'predicted tok/s':>15} {'error':>7}  within ±25%"]
        phases = [("decode", self.measured_ms, self.predicted_ms, 1),
                  (f"prefill {self.prefill_tokens}", self.measured_prefill_ms, self.predicted_prefill_ms,
                   self.prefill_tokens)]
        for phase, measured, predicted, tokens in phases:
            for label, m in measured.items():
                p = predicted[label]
                err = p / m - 1.0
                ok = "yes" if abs(err) <= TOLERANCE else "NO"
                rows.append(f"{phase:<8} {label:<20} {tokens * 1e3 / m:>14.1f} {tokens * 1e3 / p:>15.1f} "
                            f"{100 * err:>+6.1f}%  {ok}")
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


def predicted_prefill_ms(plan_fn, model, label: str, prefill_tokens: int) -> float:
    """The plan's prediction for one prompt of `prefill_tokens` ("original": the plan's 'before')."""
    p = plan_fn(model, **{**OPTIONS["none" if label == "original" else label], "prompt_len": prefill_tokens})
    return p.prediction.prefill_ms_before if label == "original" else p.prediction.prefill_ms_after


def _meta_model(config: dict):
    """The model of a stored config on the meta device: planning reads shapes only."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "model_type"},
                               model_type=config["model_type"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def check_predictions(name: str = "smollm2", *, new_tokens: int = 32, repeats: int = 3,
                      labels: list[str] | None = None, prefill_tokens: int = 512,
                      progress: bool = True) -> PredictionCheck:
    """Measure decode ms/token and one prompt's ms for each option and predict them; see the
    module docstring. `prefill_tokens=0` skips prompts."""
    from ..api import accelerate, plan
    from ..hardware import inspect_hardware
    from ..measure import measured_cpu_costs
    from ..planner.cost import device_costs
    from .models import load_model
    from .perplexity import calibration_samples
    from .timing import chat_prompt_ids, measure_decode, measure_prefill, prompt_ids

    labels = labels or list(OPTIONS)
    unknown = sorted(set(labels) - set(OPTIONS))
    if unknown:
        raise InvalidOptionError(f"unknown options {unknown}; choose from {list(OPTIONS)}")
    _, tokenizer = load_model(name)
    ids = chat_prompt_ids(tokenizer)
    prompt = prompt_ids(tokenizer, prefill_tokens) if prefill_tokens else None
    hardware = inspect_hardware()
    costs = device_costs(hardware, "cpu", measured_cpu_costs(hardware))
    models = {}
    for label in labels:
        model = load_model(name)[0]
        if not models:
            check = PredictionCheck(name, int(ids.shape[1]), new_tokens, costs.to_dict(), model.config.to_dict(),
                                    prefill_tokens=prefill_tokens)
            base = _meta_model(check.config)
        if label != "original":
            kwargs = option_kwargs(label, check.prompt_tokens, new_tokens)
            cal = calibration_samples(tokenizer, n=8, seq_len=128) if kwargs.get("quantize") == "w8a8" else None
            model = accelerate(model, calibration_data=cal, **kwargs)
        models[label] = model
        check.predicted_ms[label] = predicted_ms(plan, base, label, check.prompt_tokens, new_tokens)
        if prompt is not None:
            check.predicted_prefill_ms[label] = predicted_prefill_ms(plan, base, label, prefill_tokens)
    # A whole round first, not kept: on a VM, memory the process has not touched yet runs slow
    # for a while (seen: per-group decode at 24, 32, then 48 tok/s in three rounds of one process).
    for model in models.values():
        measure_decode(model, ids, new_tokens)
        if prompt is not None:
            measure_prefill(model, prompt)
    runs: dict[str, list[float]] = {label: [] for label in labels}
    prefill_runs: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        for label, model in models.items():
            runs[label].append(measure_decode(model, ids, new_tokens) * 1e3 / new_tokens)
            if prompt is not None:
                prefill_runs[label].append(measure_prefill(model, prompt) * 1e3)
        if progress:
            print(f"round {r + 1}/{repeats} done", flush=True)
    check.measured_ms = {label: statistics.median(v) for label, v in runs.items()}
    if prompt is not None:
        check.measured_prefill_ms = {label: statistics.median(v) for label, v in prefill_runs.items()}
    return check


def repredict(check: dict) -> dict[str, float]:
    """Decode predictions for a stored check, from its stored costs and config, with today's
    cost model."""
    return _repredict(check, lambda plan_fn, model, label: predicted_ms(
        plan_fn, model, label, check["prompt_tokens"], check["new_tokens"]), check["measured_ms"])


def repredict_prefill(check: dict) -> dict[str, float]:
    """Prompt predictions for a stored check, like `repredict` (empty if prompts were not timed)."""
    return _repredict(check, lambda plan_fn, model, label: predicted_prefill_ms(
        plan_fn, model, label, check["prefill_tokens"]), check.get("measured_prefill_ms", {}))


def _repredict(check: dict, predict, labels) -> dict[str, float]:
    from ..config import Options
    from ..hardware import inspect_hardware
    from ..planner import make_plan
    from ..planner.device_costs import DeviceCosts

    costs = DeviceCosts.from_dict(check["costs"])
    model = _meta_model(check["config"])
    hw = inspect_hardware()
    return {label: predict(lambda m, **kw: make_plan(m, hw, Options.from_kwargs(**kw), cpu_costs=costs), model, label)
            for label in labels}
