"""accelerate() and plan(): the public entry points, their refusals and their guarantees."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm import (AlreadyAcceleratedError, ForeignQuantizationError, HardwareError, HeteroLLMError,
                        HeteroLLMWarning, InvalidOptionError, KernelConfig, MetaDeviceError,
                        NonFiniteWeightError, NotAModelError, Plan, PlanMismatchError, PruneConfig, QuantConfig)
from hetero_llm.fused.modules import RMSNorm, RotaryAttention
from hetero_llm.quant import Int8Linear

# Tolerances, in one place: fusions alone are fp32-exact up to summation order; INT8 is loose.
TOL = {"fused_fp32": dict(atol=1e-4, rtol=1e-4), "int8_rel": 5e-2}

VOCAB = 256
BASE = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
SHAPES = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128),
}


def tiny(model_type: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    cfg = AutoConfig.for_model(model_type, **{**BASE, **SHAPES[model_type], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def ids(length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, types: dict[str, type], weights: dict[str, torch.Tensor]) -> None:
    assert module_types(model) == types
    now = model.state_dict()
    assert now.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(now[k], v) or (v.isnan().any() and torch.equal(now[k].isnan(), v.isnan())), k
    assert not hasattr(model, "hetero_plan")


# -- the contract ---------------------------------------------------------------------------

def test_accelerate_returns_same_object_with_plan_and_replacements():
    model = tiny()
    out = hetero_llm.accelerate(model)
    assert out is model
    assert isinstance(model.hetero_plan, Plan)
    assert model.hetero_plan.model_type == "llama" and model.hetero_plan.device == "cpu"
    assert model.hetero_replaced and all(len(r) == 3 for r in model.hetero_replaced)
    assert ("lm_head", "Linear", "Int8Linear") in model.hetero_replaced
    assert isinstance(model.model.layers[0].self_attn, RotaryAttention)


def test_plan_does_not_touch_the_model():
    model = tiny()
    types, weights = module_types(model), state(model)
    p = hetero_llm.plan(model, hardware="cpu-2core")
    assert isinstance(p, Plan) and p.by_action("quantize")
    assert_unchanged(model, types, weights)


def test_same_request_again_is_a_noop():
    model = hetero_llm.accelerate(tiny(), quantize="int8")
    first_plan, first_replaced = model.hetero_plan, model.hetero_replaced
    weights = state(model)
    assert hetero_llm.accelerate(model, quantize="int8") is model
    assert hetero_llm.accelerate(model, plan=first_plan) is model
    assert model.hetero_plan is first_plan and model.hetero_replaced is first_replaced
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in weights.items())


def test_different_request_again_raises_already_accelerated():
    model = hetero_llm.accelerate(tiny())
    with pytest.raises(AlreadyAcceleratedError, match="Load the original model again"):
        hetero_llm.accelerate(model, quantize="none")
    other = hetero_llm.plan(tiny(), quantize="int8-asym")
    with pytest.raises(AlreadyAcceleratedError, match="accelerate"):
        hetero_llm.accelerate(model, plan=other)


def test_plan_made_for_named_hardware_can_be_applied():
    model = tiny()
    p = hetero_llm.plan(model, hardware="cpu-2core")
    out = hetero_llm.accelerate(model, plan=p)
    assert out is model and model.hetero_plan == p
    for e in p.by_action("quantize"):
        assert e.name not in dict(model.named_modules()) or not isinstance(model.get_submodule(e.name), nn.Linear)
    assert isinstance(model.lm_head, Int8Linear)


def test_options_as_config_dataclasses_are_honoured():
    ref = tiny()
    model = hetero_llm.accelerate(copy.deepcopy(ref), quantize=QuantConfig(scheme="int8-asym", lm_head=False),
                                  kernels="torch")
    assert type(model.lm_head) is nn.Linear
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert int8 and all(m.scheme == "int8-asym" and m.zero_point is not None for m in int8)
    assert all(m.backend == "torch-dequant" for m in int8)
    x = ids(12)
    want = logits(ref, x)
    assert ((logits(model, x) - want).abs().max() / want.abs().max()).item() < TOL["int8_rel"]


def test_quantize_none_with_fusions_disabled_is_exact():
    ref = tiny()
    model = hetero_llm.accelerate(copy.deepcopy(ref), quantize="none",
                                  kernels=KernelConfig(fuse_projections=False, fuse_norms=False))
    assert not model.hetero_plan.fusions
    assert not any(isinstance(m, (Int8Linear, RMSNorm, RotaryAttention)) for m in model.modules())
    x = ids(12)
    torch.testing.assert_close(logits(model, x), logits(ref, x), **TOL["fused_fp32"])


# -- refusals: typed, before any change, and naming the fix -------------------------------------

@pytest.mark.parametrize("obj", [42, "gpt2", nn.Linear(4, 4), None])
def test_not_a_model(obj):
    with pytest.raises(NotAModelError, match="AutoModelForCausalLM") as info:
        hetero_llm.accelerate(obj)
    assert isinstance(info.value, TypeError) and isinstance(info.value, HeteroLLMError)
    with pytest.raises(NotAModelError):
        hetero_llm.plan(obj)


def test_meta_device_model_is_refused_with_a_pointer_to_plan():
    cfg = AutoConfig.for_model("llama", **BASE, **SHAPES["llama"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(MetaDeviceError, match=r"plan\(\)") as info:
        hetero_llm.accelerate(model)
    assert "real weights" in str(info.value)
    assert not hasattr(model, "hetero_plan")
    assert hetero_llm.plan(model).by_action("quantize")  # planning a meta model is fine


def test_foreign_quantization_config_is_refused():
    model = tiny()
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    types, weights = module_types(model), state(model)
    with pytest.raises(ForeignQuantizationError, match="gptq") as info:
        hetero_llm.accelerate(model)
    assert "unquantized" in str(info.value)
    assert_unchanged(model, types, weights)


def test_torch_dynamic_quantized_model_is_refused():
    quantize_dynamic = getattr(getattr(torch, "ao", None), "quantization", None)
    if quantize_dynamic is None or not hasattr(quantize_dynamic, "quantize_dynamic"):
        pytest.skip("torch.ao.quantization.quantize_dynamic is not in this torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_dynamic.quantize_dynamic(tiny(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ForeignQuantizationError, match="floating-point") as info:
        hetero_llm.accelerate(model)
    assert "q_proj" in str(info.value)
    assert not hasattr(model, "hetero_plan")


def test_plan_from_another_model_is_refused():
    model = tiny("llama")
    types, weights = module_types(model), state(model)
    foreign = hetero_llm.plan(tiny("gpt2"))
    with pytest.raises(PlanMismatchError, match=r"hetero_llm\.plan\(model\)"):
        hetero_llm.accelerate(model, plan=foreign)
    deeper = hetero_llm.plan(tiny("llama", num_hidden_layers=3))
    with pytest.raises(PlanMismatchError, match="layers.2"):
        hetero_llm.accelerate(model, plan=deeper)
    assert_unchanged(model, types, weights)


def test_plan_from_a_model_of_another_size_is_refused():
    # Same family, names and module types; only the shapes differ. Applying it would pick
    # kernels for shapes the model does not have (cpu-int8pack for in_features=40 crashes).
    model = tiny("llama", hidden_size=40)
    types, weights = module_types(model), state(model)
    foreign = hetero_llm.plan(tiny("llama"), hardware="cpu-2core")
    with pytest.raises(PlanMismatchError, match="parameters") as info:
        hetero_llm.accelerate(model, plan=foreign)
    assert "hetero_llm.plan(model)" in str(info.value)
    assert_unchanged(model, types, weights)


def test_nan_weight_is_refused_before_any_change():
    model = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    types, weights = module_types(model), state(model)
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.1\.mlp\.down_proj") as info:
        hetero_llm.accelerate(model)
    assert "quantize='none'" in str(info.value)
    assert not any(isinstance(m, (Int8Linear, RMSNorm, RotaryAttention)) for m in model.modules())
    assert_unchanged(model, types, weights)


def test_inf_weight_in_lm_head_is_refused():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightError, match="lm_head"):
        hetero_llm.accelerate(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_training_mode_warns_and_switches_to_eval():
    model = tiny().train()
    with pytest.warns(HeteroLLMWarning, match="eval"):
        hetero_llm.accelerate(model)
    assert not model.training
    assert not model.model.layers[0].mlp.act_fn.training  # original submodules too


def test_accelerated_model_is_entirely_in_eval_mode():
    model = hetero_llm.accelerate(tiny())
    assert sorted({type(m).__name__ for m in model.modules() if m.training}) == []


def test_eval_mode_does_not_warn():
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeteroLLMWarning)
        hetero_llm.accelerate(model)


def test_calibration_data_that_nothing_uses_is_refused():
    model = tiny()
    with pytest.raises(InvalidOptionError, match="calibration_data"):
        hetero_llm.accelerate(model, calibration_data=[ids()])
    assert not hasattr(model, "hetero_plan")


@pytest.mark.parametrize("options, hint", [
    (dict(quantize="w8a8", outlier_channels=4), "known options"),
    (dict(quantize="int4"), "not available"),
    (dict(kernels="cuda"), "choose one of"),
    (dict(prune="wnada"), "Did you mean 'wanda'"),
    (dict(prune="3:2"), "0 < N < M"),
    (dict(prune="1:1"), "0 < N < M"),
    (dict(prune=0.5), "PruneConfig"),
    (dict(prune=PruneConfig(method="structured", heads=0.25, criterion="magnitude")), "rounds to none"),
    (dict(prune=KernelConfig()), "PruneConfig"),
    (dict(tp=0), "positive integer"),
    (dict(pp=2, micro_batches=-1), "micro_batches"),
    (dict(tp=2, timeout_s=0), "timeout_s"),
    (dict(tp=2, vocab_parallel="yes"), "vocab_parallel"),
    (dict(tp=2, device_map={"model.layers.0": "cpu"}), "cannot be combined"),
    (dict(quantise="int8"), "Did you mean 'quantize'"),
    (dict(kernel="torch"), "Did you mean 'kernels'"),
    (dict(quantize="int9"), "Did you mean 'int8'"),
    (dict(device="gpu"), "choose one of"),
    (dict(quantize=8), "QuantConfig"),
    (dict(kernels=QuantConfig()), "KernelConfig"),
])
def test_invalid_options_are_refused_before_any_change(options, hint):
    model = tiny()
    types, weights = module_types(model), state(model)
    with pytest.raises(InvalidOptionError, match=hint) as info:
        hetero_llm.accelerate(model, **options)
    assert isinstance(info.value, ValueError)
    assert_unchanged(model, types, weights)
    with pytest.raises(InvalidOptionError):
        hetero_llm.plan(model, **options)


def test_triton_kernels_on_a_cpu_without_the_interpreter_are_refused_before_any_change():
    from hetero_llm.kernels.triton_utils import TRITON_AVAILABLE, interpreted
    if TRITON_AVAILABLE and interpreted():
        pytest.skip("this process runs Triton's interpreter, where kernels='triton' on CPU is allowed")
    model = tiny()
    types, weights = module_types(model), state(model)
    with pytest.raises(HardwareError, match="needs a CUDA GPU.*TRITON_INTERPRET=1.*kernels='auto'"):
        hetero_llm.accelerate(model, kernels="triton", device="cpu")
    assert_unchanged(model, types, weights)


def test_plan_and_options_together_are_refused():
    model = tiny()
    p = hetero_llm.plan(model)
    with pytest.raises(InvalidOptionError, match="either plan= or options"):
        hetero_llm.accelerate(model, plan=p, quantize="none")


def test_bad_hardware_argument():
    model = tiny()
    with pytest.raises(InvalidOptionError, match="hardware"):
        hetero_llm.plan(model, hardware=42)
    with pytest.raises(HardwareError):
        hetero_llm.plan(model, hardware="no-such-machine")
    with pytest.raises(HardwareError, match="device='cpu'"):
        hetero_llm.plan(model, hardware="cpu-2core", device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_plan_on_cpu_machine_fails_before_any_change():
    model = tiny()
    types, weights = module_types(model), state(model)
    p = hetero_llm.plan(model, hardware="h100-80gb", quantize="int8")
    assert p.device == "cuda"
    with pytest.raises(HardwareError):
        hetero_llm.accelerate(model, plan=p)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert_unchanged(model, types, weights)


def test_edited_plan_applies_cleanly_or_refuses_before_any_change():
    ref = tiny()
    model = copy.deepcopy(ref)
    types, weights = module_types(model), state(model)
    p = hetero_llm.plan(model).with_entry("model.layers.0.self_attn.k_proj", action="keep",
                                          kernel="torch", quant=None)
    try:
        hetero_llm.accelerate(model, plan=p)
    except HeteroLLMError:
        assert_unchanged(model, types, weights)
    else:
        attn = model.model.layers[0].self_attn
        assert type(attn.k_proj) is nn.Linear and isinstance(attn.q_proj, Int8Linear)
        x = ids(12)
        want = logits(ref, x)
        assert ((logits(model, x) - want).abs().max() / want.abs().max()).item() < TOL["int8_rel"]


def test_plan_with_inconsistent_fusion_is_refused_before_any_change():
    # Entries edited without going through with_entry: a fused group now mixes an INT8
    # member with a floating-point one, which cannot be one matmul.
    model = tiny()
    types, weights = module_types(model), state(model)
    p = hetero_llm.plan(model)
    k = "model.layers.0.self_attn.k_proj"
    entries = tuple(dataclasses.replace(e, action="keep", kernel="torch", quant=None) if e.name == k else e
                    for e in p.entries)
    broken = dataclasses.replace(p, entries=entries)
    assert any(k in f.members for f in broken.fusions)
    with pytest.raises(HeteroLLMError):
        hetero_llm.accelerate(model, plan=broken)
    assert_unchanged(model, types, weights)
