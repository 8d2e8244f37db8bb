"""Before accelerate() changes a model: prove that its swaps reproduce transformers' own modules on
the installed transformers.

hetero_llm puts its own modules (fused attention, fused MLP, norms, the fused layer forward, the
decode step behind generate()) where transformers' were, and they are called by transformers' code:
with its argument names, caches and masks, which change between releases. Kernel and quantization
numerics are tested against references elsewhere; this guards that contract, on the release the
user has, including one that did not exist when hetero_llm was written.

How: a tiny random model of the model's own class and config (two layers, small widths, the same
attention, rotary, norm and cache settings; `integrations.tiny`) generates greedily, first as
transformers built it, then with the plan's parts swapped in (unquantized, on the CPU), with a
dynamic cache, a static cache and a left-padded batch. Tokens must be identical and logits equal to
float rounding. A failing combination is split to find the parts that differ. The verdict is cached
per (code, transformers, torch, model class, config, parts) in memory and on disk, so it costs once.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ._files import cache_dir, write_text_atomically
from .config import Options
from .decode import decode_pass
from .errors import HeteroLLMWarning, SelfCheckError
from .hardware import hardware_profile
from .integrations import hf_adapter as hf
from .integrations.tiny import TinyModelError, tiny_model
from .integrations.transformers import spec_for
from .fused.apply import kernels_pass
from .kernels.triton_utils import interpreted
from .planner import Plan, make_plan
from .planner.swaps import (PARTS, REQUIRES, plan_parts, quantized_groups, with_only_parts,
                            with_requirements_removed, without_linear_groups, without_parts)
from .quant.apply import quantize_pass

CHECK_VERSION = 1
NEW_TOKENS = 6
PROMPT_LEN = 7
# Relative to the largest |logit|: the swaps reorder float sums (~1e-7 in fp32); a convention
# misread (a cache not used, a mask ignored, a norm's offset lost) differs by far more.
LOGIT_RTOL = 1e-4
# INT8 per-channel weights keep a tiny model's logits at cosine > 0.999; a linear whose weight the
# model bypasses (reads as a float tensor) does not.
INT8_MIN_COSINE = 0.98

# The tiny model's size limit. Where a config's own rules refuse the tiny widths, its real widths with
# two layers are used instead: the swaps' check refuses past TINY_MAX_PARAMS; the INT8-linears check
# of an unknown family (the only way to tell which of its linears it reads directly) goes further.
TINY_MAX_PARAMS = 50_000_000
LINEAR_CHECK_MAX_PARAMS = 300_000_000

_VERDICTS: dict[str, "Verdict"] = {}


@dataclass(frozen=True)
class Verdict:
    """Which of the checked parts reproduce transformers' modules; `failed`: part -> what differed."""

    parts: tuple[str, ...]
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    transformers: str = ""
    unverified: str | None = None  # why nothing could be compared (no tiny model of this config)

    @property
    def ok(self) -> bool:
        return not self.failed and self.unverified is None

    def to_dict(self) -> dict:
        return {"parts": list(self.parts), "failed": dict(self.failed), "seconds": self.seconds,
                "transformers": self.transformers, "unverified": self.unverified}

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        return cls(tuple(d["parts"]), dict(d["failed"]), float(d["seconds"]), str(d["transformers"]),
                   d.get("unverified"))


# -- what is compared ----------------------------------------------------------------------------

def _scenarios(vocab: int) -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(1)
    low = min(3, vocab - 1)  # ids 0-2 are often special tokens; the pad below is 0
    prompt = torch.randint(low, vocab, (1, PROMPT_LEN), generator=g)
    batch = torch.randint(low, vocab, (2, PROMPT_LEN), generator=g)
    mask = torch.ones_like(batch)
    batch[1, :3], mask[1, :3] = 0, 0  # the second prompt is 3 tokens shorter, padded on the left
    ones = torch.ones_like(prompt)
    return [("dynamic cache", dict(input_ids=prompt, attention_mask=ones)),
            ("static cache", dict(input_ids=prompt, attention_mask=ones, cache_implementation="static")),
            ("left-padded batch", dict(input_ids=batch, attention_mask=mask))]


def _generation_config():
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=0, bos_token_id=None, eos_token_id=None,
                            output_logits=True, return_dict_in_generate=True)


@contextlib.contextmanager
def _quiet():
    """transformers' generate() warns about tiny-model settings the user never sees."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _outputs(model: nn.Module, vocab: int, names=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per scenario: (generated tokens, logits of every step) of greedy generation. `names=None`:
    every scenario the model runs (one transformers itself cannot run for this model is left out);
    otherwise exactly those, any failure raised."""
    out = {}
    with _quiet(), torch.no_grad():
        for name, inputs in _scenarios(vocab):
            if names is not None and name not in names:
                continue
            try:
                result = model.generate(**inputs, generation_config=_generation_config())
            except Exception:  # noqa: BLE001 - only for the reference: see the docstring
                if names is not None:
                    raise
                continue
            out[name] = (result.sequences, torch.stack([x.float() for x in result.logits], dim=1))
    return out


def _difference(reference: dict, model: nn.Module, vocab: int) -> str | None:
    """What differs from the reference outputs, or None."""
    try:
        got = _outputs(model, vocab, tuple(reference))
    except Exception as e:  # noqa: BLE001 - any failure of a swapped model is the finding
        return f"generate() raised {type(e).__name__}: {str(e)[:300]}"
    for name, (tokens, logits) in reference.items():
        tokens2, logits2 = got[name]
        scale = max(float(logits.abs().max()), 1e-6)
        diff = float((logits2 - logits).abs().max()) / scale if logits2.shape == logits.shape else float("inf")
        if diff > LOGIT_RTOL:
            return f"{name}: logits differ by {diff:.2g} of their range (float rounding gives ~1e-6)"
        if not torch.equal(tokens, tokens2):
            return f"{name}: generated tokens differ"
    return None


def _int8_difference(reference: dict, model: nn.Module, vocab: int) -> str | None:
    """What is wrong with an INT8 model's outputs: an error, or first-step logits that are not the
    reference's up to INT8 rounding (later steps may follow another token, so they are not compared)."""
    try:
        got = _outputs(model, vocab, tuple(reference))
    except Exception as e:  # noqa: BLE001 - e.g. a linear whose weight the model reads directly
        return f"generate() raised {type(e).__name__}: {str(e)[:300]}"
    for name, (_, logits) in reference.items():
        first, first2 = logits[:, 0].flatten(), got[name][1][:, 0].flatten()
        cos = float(torch.nn.functional.cosine_similarity(first, first2, dim=0))
        if not cos >= INT8_MIN_COSINE:
            return f"{name}: INT8 logits are not the original's (cosine {cos:.3f})"
    return None


# -- one trial -------------------------------------------------------------------------------------

def _tiny_plan(tiny: nn.Module, parts: tuple[str, ...], backend: str) -> Plan:
    options = Options.from_kwargs(quantize="none", prune="none", kernels="torch", device="cpu",
                                  decode="transformers")
    plan = make_plan(tiny, hardware_profile("cpu-2core"), options, strict=True)
    plan = with_only_parts(plan, parts, tiny, spec_for(tiny))
    # The fused modules keep the real plan's backend: on CPU tensors a "triton" module runs its torch
    # path, but through the same branches (e.g. the residual handed to o_proj) as on the GPU.
    return replace(plan, model_settings={**plan.model_settings, "kernels": backend})


def _trial(pristine: nn.Module, reference: dict, parts: tuple[str, ...], backend: str, vocab: int) -> str | None:
    tiny = copy.deepcopy(pristine)
    try:
        plan = _tiny_plan(tiny, parts, backend)
        missing = set(parts) - set(plan_parts(plan))
        if missing:
            return f"the tiny model's plan has no {', '.join(sorted(missing))} (its config may differ in kind)"
        kernels_pass(tiny, plan)
        decode_pass(tiny, plan)
        tiny.hetero_plan = plan
    except Exception as e:  # noqa: BLE001 - a swap that cannot even be applied
        return f"applying it raised {type(e).__name__}: {str(e)[:300]}"
    return _difference(reference, tiny, vocab)


def _linear_trial(pristine: nn.Module, reference: dict, groups: tuple[str, ...], vocab: int) -> str | None:
    tiny = copy.deepcopy(pristine)
    try:
        options = Options.from_kwargs(quantize="int8", kernels="torch", device="cpu", decode="transformers")
        plan = make_plan(tiny, hardware_profile("cpu-2core"), options, strict=False)
        plan = without_linear_groups(plan, set(quantized_groups(plan)) - set(groups), "not under test")
        quantize_pass(tiny, plan, None)
    except Exception as e:  # noqa: BLE001
        return f"quantizing it raised {type(e).__name__}: {str(e)[:300]}"
    return _int8_difference(reference, tiny, vocab)


def _isolate(run, parts: tuple[str, ...], together: str) -> dict[str, str]:
    """Which parts fail: each alone (with what it needs), then the passing ones together."""
    failed = {}
    for part in parts:
        alone = tuple(p for p in parts if p == part or p in REQUIRES.get(part, ()))
        if any(p in failed for p in alone if p != part):
            continue  # its requirement already failed; it is taken out with it
        why = run(alone)
        if why is not None:
            failed[part] = why
    rest = tuple(p for p in parts if p not in with_requirements_removed(failed))
    if rest and not failed:
        failed = {p: f"only together with the others: {together}" for p in parts}
    elif rest and run(rest) is not None:
        failed.update({p: f"together with the others: {together}" for p in rest})
    return failed


# -- the verdict -------------------------------------------------------------------------------------

def _code_digest() -> str:
    """Sizes and times of hetero_llm's own sources: an edited install is checked again."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _key(model: nn.Module, parts: tuple[str, ...], backend: str) -> str:
    from ._version import __version__

    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    text = json.dumps([CHECK_VERSION, __version__, _code_digest(), hf.transformers_version(), torch.__version__,
                       f"{type(model).__module__}.{type(model).__qualname__}", config, list(parts), backend],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cached(key: str) -> Verdict | None:
    if key in _VERDICTS:
        return _VERDICTS[key]
    path = cache_dir() / "selfcheck" / f"{key}.json"
    try:
        verdict = Verdict.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _VERDICTS[key] = verdict
    return verdict


def _store(key: str, verdict: Verdict) -> None:
    _VERDICTS[key] = verdict
    with contextlib.suppress(OSError):  # a read-only home only costs the check again next time
        write_text_atomically(cache_dir() / "selfcheck" / f"{key}.json", json.dumps(verdict.to_dict()))


def _checked(key: str, model: nn.Module, items: tuple[str, ...], trial, max_params: int = TINY_MAX_PARAMS) -> Verdict:
    """The cached verdict for `key`, or: `trial(pristine, reference, subset, vocab)` on a tiny model
    of `model`'s class and config, for all `items` at once, then split if that fails."""
    cached = _cached(key)
    if cached is not None:
        return cached
    start = time.perf_counter()
    try:
        pristine = tiny_model(type(model), model.config, max_params=max_params)
        vocab = int(hf.text_config(pristine.config).vocab_size)
        reference = _outputs(pristine, vocab)
    except TinyModelError as e:
        pristine, reference, unverified = None, {}, f"no small model of this config could be built ({e})"
    else:
        unverified = None if reference else "transformers' own tiny model does not generate from text alone"
    if unverified:  # nothing to compare against: said, not guessed
        verdict = Verdict(items, {}, round(time.perf_counter() - start, 3), hf.transformers_version(), unverified)
        _store(key, verdict)
        return verdict

    def run(subset):
        return trial(pristine, reference, subset, vocab)

    why = run(items)
    failed = {} if why is None else _isolate(run, items, why)
    verdict = Verdict(items, failed, round(time.perf_counter() - start, 3), hf.transformers_version())
    _store(key, verdict)
    return verdict


def check_parts(model: nn.Module, parts: tuple[str, ...], backend: str = "torch") -> Verdict:
    """Whether `parts` reproduce transformers' modules for `model`'s class and config (cached)."""
    backend = "torch" if interpreted() else backend  # the interpreter would run every kernel, slowly

    def trial(pristine, reference, subset, vocab):
        return _trial(pristine, reference, subset, backend, vocab)

    return _checked(_key(model, parts, backend), model, parts, trial)


def check_linear_groups(model: nn.Module, groups: tuple[str, ...]) -> Verdict:
    """For a family without a role table: which groups of linears (linear_group names) break the
    model when stored as INT8 (cached). `failed` names the groups that must stay in float."""
    return _checked(_key(model, ("linears", *groups), "int8"), model, groups, _linear_trial,
                    max_params=LINEAR_CHECK_MAX_PARAMS)


def _as_failures(verdict: Verdict) -> Verdict:
    """Swaps that could not be checked count as failed: they are only made once proven."""
    if verdict.unverified is None:
        return verdict
    return replace(verdict, failed={p: verdict.unverified for p in verdict.parts}, unverified=None)


def _message(model: nn.Module, verdict: Verdict) -> str:
    lines = "; ".join(f"{part}: {why}" for part, why in verdict.failed.items())
    verb = "does" if len(verdict.failed) == 1 else "do"
    cause = (f"transformers {verdict.transformers} is in the tested range, so this is a hetero_llm bug: please "
             "report it with this message" if hf.in_tested_range(verdict.transformers) else
             "This transformers release changed a convention hetero_llm relies on")
    return (f"hetero_llm's {', '.join(verdict.failed)} {verb} not reproduce transformers {verdict.transformers}'s own "
            f"modules for {type(model).__name__} (checked on a tiny model of its config before changing "
            f"anything: {lines}). {cause} (tested: {hf.OLDEST_SUPPORTED} to {hf.NEWEST_TESTED}.x).")


def _verify_linears(model: nn.Module, plan: Plan) -> Plan:
    """An unknown family's plan without the linears whose INT8 module breaks the model (warned). If
    no small model of its config can be built, nothing proves any of them safe: all stay in float."""
    groups = quantized_groups(plan)
    if plan.family is not None or not groups:
        return plan
    verdict = check_linear_groups(model, groups)
    if verdict.ok:
        return plan
    if verdict.unverified:
        failed = dict.fromkeys(groups, verdict.unverified)
        why = f"its INT8 linears could not be checked: {verdict.unverified}"
        reason = "self-check: could not be checked on a small model of this config"
    else:
        failed = verdict.failed
        why = "it reads some linears' weights directly: " + "; ".join(f"{g}: {w}" for g, w in failed.items())
        reason = "self-check: the model reads this linear's weight directly, which an INT8 module does not hold"
    warnings.warn(f"{type(model).__name__} (no role table, strict=False): {why}. They stay in floating point.",
                  HeteroLLMWarning, stacklevel=4)
    return without_linear_groups(plan, failed, reason)


def verify_plan(model: nn.Module, plan: Plan, *, strict: bool) -> Plan:
    """`plan` if every part it swaps in passes the self-check; otherwise, with `strict`, a
    SelfCheckError naming the parts, and without, the plan minus those parts (and what needs
    them), with a HeteroLLMWarning saying so."""
    plan = _verify_linears(model, plan)
    parts = plan_parts(plan)
    if not parts:
        return plan
    verdict = _as_failures(check_parts(model, parts, plan.model_settings.get("kernels", "torch")))
    if verdict.ok:
        return plan
    message = _message(model, verdict)
    if strict:
        keep = ("strict=False to keep only the swaps that pass (the rest stays transformers' own; INT8 linears "
                "still apply).")
        advice = (f"Pass {keep}" if hf.in_tested_range(verdict.transformers) else
                  f"Install a tested transformers (pip install \"{hf.tested_requirement()}\"), or pass {keep}")
        raise SelfCheckError(f"{message} {advice}", tuple(verdict.failed))
    removed = with_requirements_removed(verdict.failed)
    warnings.warn(f"{message} strict=False: these stay transformers' own modules: "
                  f"{', '.join(p for p in PARTS if p in removed)}.", HeteroLLMWarning, stacklevel=3)
    return without_parts(plan, removed, f"self-check failed on transformers {verdict.transformers}")


def require_parts(model: nn.Module, plan: Plan, what: str) -> None:
    """For load(): a saved plan's swaps are rebuilt as saved (its tensors are laid out for them), so a
    part that fails here is a SelfCheckError, whatever `strict` was when it was made."""
    parts = plan_parts(plan)
    verdict = _as_failures(check_parts(model, parts, plan.model_settings.get("kernels", "torch"))) if parts else None
    if verdict is None or verdict.ok:
        return
    raise SelfCheckError(f"{_message(model, verdict)} {what} needs them. Load it with the transformers it was "
                         "saved with, or accelerate the original model again here (strict=False keeps only "
                         "the swaps that pass).", tuple(verdict.failed))
