"""accelerate()'s self-check: the swaps are proven against transformers' own modules on the installed
release before anything changes, and a mismatch is refused (strict) or left out (strict=False)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import hetero_llm
from hetero_llm import KernelConfig, selfcheck
from hetero_llm.errors import HeteroLLMWarning, SelfCheckError
from hetero_llm.fused import modules as kernel_modules
from hetero_llm.planner.swaps import PARTS, plan_parts
from tiny_models import FAMILIES, LLAMA_LIKE, assert_same_tokens, tiny_model

GPU_PARTS = ("norms", "attention", "mlp", "decoder_layer", "attention_interface", "decode_step")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch, tmp_path):
    """Each test starts with no verdict in memory or on disk."""
    monkeypatch.setattr(selfcheck, "cache_dir", lambda: tmp_path)  # the CPU measurements stay cached
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})


@pytest.fixture
def cache_ignored(monkeypatch):
    """The transformers <= 5.24 reading of the KV cache (past_key_values= only) on a release that
    passes it as cache=: the fused attention then attends the new tokens alone."""
    original = kernel_modules.RotaryAttention.forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                residual=None, cache_lens=None, **kwargs):
        kwargs.pop("cache", None)
        return original(self, hidden_states, position_embeddings, attention_mask, None, residual, cache_lens,
                        **kwargs)

    monkeypatch.setattr(kernel_modules.RotaryAttention, "forward", forward)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_passes_with_the_parts_its_cpu_plan_uses(family):
    model = tiny_model(family)
    parts = plan_parts(hetero_llm.plan(model, quantize="none"))
    verdict = selfcheck.check_parts(model, parts)
    assert verdict.ok, verdict.failed
    assert verdict.parts == parts


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_llama_like_families_pass_with_the_gpu_parts(family, backend):
    """What a GPU plan swaps in (fused layer forward, attention interface, decode step), checked on
    the CPU: "triton" modules take their torch paths there through the same branches."""
    model = tiny_model(family, **({"sliding_window": None} if family == "mistral" else {}))
    verdict = selfcheck.check_parts(model, GPU_PARTS, backend)
    assert verdict.ok, verdict.failed


def test_a_misread_cache_is_caught_and_named(cache_ignored):
    verdict = selfcheck.check_parts(tiny_model("llama"), ("norms", "attention", "mlp", "decode_step"))
    assert set(verdict.failed) == {"attention"}  # the decode step needs it: not tried on its own
    assert "dynamic cache" in verdict.failed["attention"] or "raised" in verdict.failed["attention"]


def test_strict_refuses_before_any_change(cache_ignored):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SelfCheckError) as err:
        hetero_llm.accelerate(model, quantize="none")
    assert err.value.parts == ("attention",)
    assert "strict=False" in str(err.value) and "transformers" in str(err.value)
    assert not hasattr(model, "hetero_plan")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__module__.startswith("hetero_llm") for m in model.modules())


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_non_strict_keeps_only_the_parts_that_pass(cache_ignored, quantize):
    original = tiny_model("llama")
    with pytest.warns(HeteroLLMWarning, match="attention"):
        accelerated = hetero_llm.accelerate(copy.deepcopy(original), quantize=quantize, strict=False)
    plan = accelerated.hetero_plan
    assert "attention" not in plan_parts(plan) and {"norms", "mlp"} <= set(plan_parts(plan))
    assert any("self-check failed" in n for n in plan.notes)
    assert not any(isinstance(m, kernel_modules.RotaryAttention) for m in accelerated.modules())
    if quantize == "none":
        assert_same_tokens(original, accelerated)
    else:
        assert plan.by_action("quantize")  # INT8 linears still apply


def test_a_user_plan_is_checked_too(cache_ignored):
    model = tiny_model("llama")
    p = hetero_llm.plan(model, quantize="none")
    with pytest.raises(SelfCheckError):
        hetero_llm.accelerate(model, plan=p)


def test_the_verdict_is_computed_once(monkeypatch):
    model = tiny_model("qwen2")
    calls = []
    real = selfcheck._outputs
    monkeypatch.setattr(selfcheck, "_outputs", lambda *a: calls.append(1) or real(*a))
    parts = ("norms", "attention", "mlp")
    first = selfcheck.check_parts(model, parts)
    runs = len(calls)
    assert runs == 2  # the reference, then the swapped model
    assert selfcheck.check_parts(model, parts) == first and len(calls) == runs  # in memory
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    assert selfcheck.check_parts(model, parts) == first and len(calls) == runs  # from disk
    files = list((selfcheck.cache_dir() / "selfcheck").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["failed"] == {}


def test_the_key_follows_what_chooses_the_swaps():
    model = tiny_model("llama")
    key = selfcheck._key(model, ("norms",), "torch")
    assert key == selfcheck._key(copy.deepcopy(model), ("norms",), "torch")
    assert key != selfcheck._key(model, ("norms", "mlp"), "torch")
    assert key != selfcheck._key(model, ("norms",), "triton")
    assert key != selfcheck._key(tiny_model("llama", rms_norm_eps=1e-5), ("norms",), "torch")


def test_plans_without_swaps_are_not_checked(monkeypatch):
    monkeypatch.setattr(selfcheck, "check_parts", lambda *a, **k: pytest.fail("checked"))
    model = tiny_model("llama")
    p = hetero_llm.plan(model, quantize="int8", kernels=KernelConfig(backend="torch", fuse_projections=False,
                                                                     fuse_norms=False))
    assert plan_parts(p) == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeteroLLMWarning)
        assert selfcheck.verify_plan(model, p, strict=True) is p


def test_parts_are_the_documented_ones():
    assert set(PARTS) == {"norms", "attention", "mlp", "projections", "decoder_layer", "attention_interface",
                          "decode_step"}


def test_load_checks_the_saved_swaps_on_this_install(tmp_path, monkeypatch):
    model = hetero_llm.accelerate(tiny_model("llama"), quantize="none")
    hetero_llm.save(model, tmp_path / "saved")
    manifest = json.loads((tmp_path / "saved" / "hetero_llm.json").read_text())
    assert manifest["transformers_version"]
    assert hetero_llm.load(tmp_path / "saved").hetero_plan == model.hetero_plan
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})  # and no verdict on disk: a fresh install
    monkeypatch.setattr(selfcheck, "cache_dir", lambda: tmp_path / "elsewhere")
    original = kernel_modules.RotaryAttention.forward
    monkeypatch.setattr(kernel_modules.RotaryAttention, "forward",
                        lambda self, h, pe=None, am=None, past_key_values=None, **kw:
                        original(self, h, pe, am, None, **{k: v for k, v in kw.items() if k != "cache"}))
    with pytest.raises(SelfCheckError, match="saved with"):
        hetero_llm.load(tmp_path / "saved")


def _tiny_mamba():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mamba", hidden_size=64, state_size=8, num_hidden_layers=2, vocab_size=256,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_an_unknown_family_keeps_in_float_the_linears_it_reads_directly():
    """Mamba reads `lm_head.weight.dtype` and multiplies by `dt_proj.weight`: INT8 modules there
    raised AttributeError in generate(). The check finds them; the rest is INT8."""
    from hetero_llm.planner.swaps import linear_group

    model = _tiny_mamba()
    with pytest.warns(HeteroLLMWarning, match="reads some linears' weights directly"):
        fast = hetero_llm.accelerate(copy.deepcopy(model), strict=False)
    plan = fast.hetero_plan
    kept = {linear_group(e.name) for e in plan.entries if e.reason.startswith("self-check")}
    assert "lm_head" in kept and plan.by_action("quantize")
    ids = torch.tensor([[5, 6, 7, 8]])
    out = fast.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_an_unknown_family_that_cannot_be_checked_stays_in_float(monkeypatch):
    from hetero_llm.integrations.tiny import TinyModelError

    def refuse(*a, **k):
        raise TinyModelError("its config refuses small widths")

    monkeypatch.setattr(selfcheck, "tiny_model", refuse)
    with pytest.warns(HeteroLLMWarning, match="could not be checked"):
        fast = hetero_llm.accelerate(_tiny_mamba(), strict=False)
    assert not fast.hetero_plan.by_action("quantize")


def test_swaps_that_cannot_be_checked_are_not_made(monkeypatch):
    from hetero_llm.integrations.tiny import TinyModelError

    monkeypatch.setattr(selfcheck, "tiny_model", lambda *a, **k: (_ for _ in ()).throw(TinyModelError("no")))
    with pytest.raises(SelfCheckError, match="no small model"):
        hetero_llm.accelerate(tiny_model("llama"), quantize="none")


@pytest.mark.parametrize("tested", [True, False])
def test_the_refusal_says_whose_fault_it_is(cache_ignored, monkeypatch, tested):
    """In the tested range a mismatch is hetero_llm's bug (report it); outside it, a changed
    convention of a newer release (install a tested one)."""
    from hetero_llm.integrations import hf_adapter

    monkeypatch.setattr(hf_adapter, "in_tested_range", lambda version=None: tested)
    with pytest.raises(SelfCheckError) as err:
        hetero_llm.accelerate(tiny_model("llama"), quantize="none")
    message = str(err.value)
    assert "attention does not reproduce" in message and "strict=False" in message
    assert ("hetero_llm bug" in message) == tested
    assert (f'pip install "{hf_adapter.tested_requirement()}"' in message) == (not tested)
