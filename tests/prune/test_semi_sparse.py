"""2:4 on sparse tensor cores: the planner's choice (CPU, hardware profiles on meta models), the
pass's fallbacks and save/load wiring (CPU, with a stand-in conversion), and the real kernels
against the dense pruned model (GPU only)."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm.errors import HeteroLLMWarning
from hetero_llm.hardware import Hardware, hardware_profile
from hetero_llm.prune.semi_sparse import SPARSE_KERNEL
from hetero_llm.prune import semi_sparse
from hetero_llm.prune.semi_sparse import dense_weight, is_semi_sparse, sparse_targets
from hetero_llm.serialize import WEIGHTS
from tiny_shapes import TINY_SHAPES

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Llama-3-8B's layer shapes (two layers): big enough for the cost model to see compute-bound matmuls.
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
               num_key_value_heads=8)
TOL = {torch.float16: dict(atol=2e-2, rtol=2e-2), torch.bfloat16: dict(atol=8e-2, rtol=8e-2)}


def meta_llama(dtype=torch.float16, **shape) -> nn.Module:
    cfg = AutoConfig.for_model("llama", **{**BASE, **(shape or LLAMA8B)})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype)


def tiny_llama(dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", **{**BASE, **TINY_SHAPES["llama"]})
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def on_sparse(e) -> bool:
    return e.kernel.split("+", 1)[0] == SPARSE_KERNEL


def pruned(plan) -> list:
    return [e for e in plan.entries if e.prune]


def gpu_hardware(capability: tuple[int, int]) -> Hardware:
    h100 = hardware_profile("h100-80gb")
    return dataclasses.replace(h100, name=f"sm_{capability[0]}{capability[1]}",
                               gpus=(dataclasses.replace(h100.gpus[0], compute_capability=capability),))


def with_sparse_kernels(plan):
    """The plan with every 2:4 entry put on the sparse kernel (fused groups kept)."""
    def edit(e):
        if not e.prune:
            return e
        base = e.kernel.split("+", 1)[0]
        return dataclasses.replace(e, kernel=SPARSE_KERNEL + e.kernel[len(base):])
    return dataclasses.replace(plan, entries=tuple(edit(e) for e in plan.entries))


def without_sparse_kernels(plan):
    def edit(e):
        return dataclasses.replace(e, kernel="torch" + e.kernel[len(SPARSE_KERNEL):]) if on_sparse(e) else e
    return dataclasses.replace(plan, entries=tuple(edit(e) for e in plan.entries))


# -- the planner's choice (CPU: hardware profiles, meta models) ----------------------------------

@pytest.mark.parametrize("hardware", ["h100-80gb", "h200-141gb", "a100-40gb", "a100-80gb", "rtx4090-24gb"])
@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_batch_one_decode_stays_dense_on_every_gpu(hardware, kernels):
    p = hetero_llm.plan(meta_llama(), hardware=hardware, prune="2:4", kernels=kernels)
    assert pruned(p) and not any(on_sparse(e) for e in p.entries)
    for e in pruned(p):
        assert "dense: " in e.reason and e.prune == "magnitude 2:4"
        assert e.decode_us_after <= e.decode_us_before
    assert any("stored dense" in n for n in p.notes)


def test_large_batch_on_h100_uses_sparse_tensor_cores_for_the_big_matmuls():
    p = hetero_llm.plan(meta_llama(), hardware="h100-80gb", prune="2:4", batch_size=256)
    sparse = [e for e in p.entries if on_sparse(e)]
    assert {e.role for e in sparse} == {"gate", "up"}  # the fused 28672x4096 gate/up matmul
    for e in sparse:
        assert e.kernel == f"{SPARSE_KERNEL}+fused:gated_mlp" and e.prune == "magnitude 2:4"
        assert "2:4 sparse tensor cores: predicted" in e.reason
        assert e.decode_us_after < e.decode_us_before
    # o/down carry the residual add in their epilogue (Triton linear_add), which reads a dense weight
    down = p.entry("model.layers.0.mlp.down_proj")
    assert down.kernel == "triton-linear_add" and "dense: the residual add" in down.reason
    assert any("use 2:4 sparse tensor cores" in n for n in p.notes)
    dense = hetero_llm.plan(meta_llama(), hardware="h100-80gb", batch_size=256)
    assert p.prediction.decode_ms_after < dense.prediction.decode_ms_after


def test_large_batch_without_linear_add_puts_down_proj_on_sparse_too():
    p = hetero_llm.plan(meta_llama(), hardware="h100-80gb", prune="2:4", batch_size=256, kernels="torch")
    roles = {e.role for e in p.entries if on_sparse(e)}
    assert {"gate", "up", "down"} <= roles
    # the 4096x4096 o_proj sits at the roofline's knee at batch 256: not predicted 1.1x faster
    assert "o" not in roles
    assert "not predicted" in p.entry("model.layers.0.self_attn.o_proj").reason


def test_sparse_targets_name_the_fused_linears():
    p = hetero_llm.plan(meta_llama(), hardware="h100-80gb", prune="2:4", batch_size=256)
    targets = sparse_targets(hetero_llm.Plan.from_json(p.to_json()))
    assert targets == {f"model.layers.{i}.mlp.gate_up": (f"model.layers.{i}.mlp.gate_proj",
                                                          f"model.layers.{i}.mlp.up_proj") for i in range(2)}


def test_cpu_stores_the_zeros_dense():
    p = hetero_llm.plan(meta_llama(dtype=torch.float32), hardware="cpu-16core", prune="2:4", batch_size=256,
                        quantize="none")
    assert pruned(p) and not any(on_sparse(e) for e in p.entries)
    assert all("dense:" not in e.reason for e in p.entries)
    assert any("same speed on CPU" in n for n in p.notes)


def test_int8_entries_stay_dense():
    p = hetero_llm.plan(meta_llama(), hardware="h100-80gb", prune="2:4", batch_size=256, quantize="int8",
                        kernels="torch")
    assert pruned(p) and not any(on_sparse(e) for e in p.entries)
    assert all("dense: int8 weights" in e.reason for e in pruned(p))


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])
def test_gpus_before_ampere_stay_dense(capability):
    p = hetero_llm.plan(meta_llama(), hardware=gpu_hardware(capability), prune="2:4", batch_size=256)
    assert p.device == "cuda" and not any(on_sparse(e) for e in p.entries)
    assert all(f"sm_{capability[0]}{capability[1]} has no sparse tensor cores" in e.reason for e in pruned(p))


def test_ampere_by_hand_is_eligible():
    p = hetero_llm.plan(meta_llama(), hardware=gpu_hardware((8, 0)), prune="2:4", batch_size=256)
    assert any(on_sparse(e) for e in p.entries)


def test_shapes_torch_cannot_hold_stay_dense():
    # 14344 inputs: a multiple of 4 (2:4 prunes it) but not of 64, and a gate/up of 2 x 14344 rows,
    # not a multiple of 32: torch's 2:4 tensors refuse both
    p = hetero_llm.plan(meta_llama(**{**LLAMA8B, "intermediate_size": 14344}), hardware="h100-80gb", prune="2:4",
                        batch_size=256, kernels="torch")
    for role in ("gate", "up", "down"):
        e = p.entry(f"model.layers.0.mlp.{role}_proj")
        assert e.prune == "magnitude 2:4" and not on_sparse(e)
        assert "torch's 2:4 tensors need rows a multiple of 32 and columns of 64" in e.reason


def test_float32_and_other_patterns_stay_dense():
    p = hetero_llm.plan(meta_llama(dtype=torch.float32), hardware="h100-80gb", prune="2:4", batch_size=256,
                        kernels="torch")
    assert not any(on_sparse(e) for e in p.entries)
    assert all("float32 weights" in e.reason for e in pruned(p))
    p = hetero_llm.plan(meta_llama(), hardware="h100-80gb", prune="4:8", batch_size=256)
    assert pruned(p) and not any(on_sparse(e) for e in p.entries)
    assert all("2:4 pattern only" in e.reason for e in pruned(p))


def test_plans_without_pruning_are_unchanged():
    a = hetero_llm.plan(meta_llama(), hardware="h100-80gb", batch_size=256)
    assert not any(on_sparse(e) or "dense:" in e.reason for e in a.entries)


# -- the pass on CPU: fallbacks, and the wiring with a stand-in conversion ---------------------

def test_pass_keeps_weights_dense_and_warns_without_a_gpu():
    plan = with_sparse_kernels(hetero_llm.plan(tiny_llama(), hardware="cpu-2core", prune="2:4", quantize="none"))
    ref = hetero_llm.accelerate(tiny_llama(), plan=without_sparse_kernels(plan))
    with pytest.warns(HeteroLLMWarning, match="stay dense.*not a CUDA GPU"):
        model = hetero_llm.accelerate(tiny_llama(), plan=plan)
    assert not any(is_semi_sparse(p) for p in model.parameters())
    x = torch.randint(0, 200, (1, 9))
    with torch.inference_mode():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_every_target_is_a_linear_after_the_kernels_pass():
    plan = with_sparse_kernels(hetero_llm.plan(tiny_llama(), hardware="cpu-2core", prune="2:4", quantize="none"))
    assert any(f.kind == "gated_mlp" for f in plan.fusions) and any(f.kind == "rotary_attention" for f in plan.fusions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HeteroLLMWarning)
        model = hetero_llm.accelerate(tiny_llama(), plan=plan)
    targets = sparse_targets(plan)
    assert "model.layers.0.self_attn.qkv" in targets and "model.layers.0.mlp.gate_up" in targets
    assert "model.layers.0.self_attn.o_proj" in targets
    for name in targets:
        assert type(model.get_submodule(name)) is nn.Linear, name


def cutlass_on_cpu(w: torch.Tensor) -> torch.Tensor:
    """torch's CUTLASS 2:4 layout, built on the CPU (its matmul needs a GPU; saving does not)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    packed, meta = sparse_semi_structured_from_dense_cutlass(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return SparseSemiStructuredTensorCUTLASS(w.shape, packed, meta, None, None, None)


@pytest.fixture
def stand_in_conversion(monkeypatch):
    """The pass as on a GPU, but converting to the CPU-built CUTLASS layout."""
    monkeypatch.setattr(semi_sparse, "_unusable", lambda w: None)
    monkeypatch.setattr(semi_sparse, "to_semi_sparse", cutlass_on_cpu)


def test_save_writes_dense_tensors_and_load_converts_again(tmp_path, stand_in_conversion):
    plan = with_sparse_kernels(hetero_llm.plan(tiny_llama(torch.float16), hardware="cpu-2core", prune="2:4",
                                               quantize="none"))
    dense = hetero_llm.accelerate(tiny_llama(torch.float16), plan=without_sparse_kernels(plan)).state_dict()
    model = hetero_llm.accelerate(tiny_llama(torch.float16), plan=plan)
    targets = sparse_targets(plan)
    assert {n for n, _, _ in model.hetero_replaced if n in targets} == set(targets)
    for name in targets:
        w = model.get_submodule(name).weight
        assert is_semi_sparse(w) and not w.requires_grad and isinstance(w, nn.Parameter)
        assert torch.equal(dense_weight(w), dense[f"{name}.weight"])
    hetero_llm.save(model, tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / WEIGHTS))
    assert saved.keys() == dense.keys()
    for k, t in saved.items():  # plain tensors, every one distinct (no sparse weights aliased)
        assert type(t) is torch.Tensor and torch.equal(t, dense[k]), k
    loaded = hetero_llm.load(tmp_path / "m")
    for name in targets:
        w = loaded.get_submodule(name).weight
        assert is_semi_sparse(w) and torch.equal(dense_weight(w), dense[f"{name}.weight"])
    assert {n for n, _, _ in loaded.hetero_replaced if n in targets} == set(targets)


def test_o_proj_with_the_residual_add_in_its_epilogue_stays_dense(monkeypatch):
    """A hand-edited plan cannot put a linear that Triton's linear_add reads on 2:4."""
    plan = with_sparse_kernels(hetero_llm.plan(tiny_llama(torch.float16), hardware="cpu-2core", prune="2:4",
                                               quantize="none"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HeteroLLMWarning)
        model = hetero_llm.accelerate(tiny_llama(torch.float16), plan=plan)
    monkeypatch.setattr(semi_sparse, "_unusable", lambda w: None)
    monkeypatch.setattr(semi_sparse, "to_semi_sparse", cutlass_on_cpu)
    attn = model.model.layers[0].self_attn
    attn.backend = "triton"
    assert "linear_add" in semi_sparse._convert(model, "model.layers.0.self_attn.o_proj")
    assert semi_sparse._convert(model, "model.layers.0.self_attn.qkv") is None  # no residual there
    assert not is_semi_sparse(attn.o_proj.weight) and is_semi_sparse(attn.qkv.weight)


@pytest.mark.parametrize("make, why", [
    (lambda w: w.float(), "float32 weights"),
    (lambda w: w[:48], "weight 48x64"),
    (lambda w: torch.ones_like(w), "not 2:4 sparse"),
])
def test_unsuitable_weights_are_refused_before_conversion(monkeypatch, make, why):
    monkeypatch.setattr(semi_sparse, "_unusable", lambda w: None)
    w = (torch.randn(64, 64) * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(16)).half()
    assert semi_sparse._refusal(w) is None
    assert why in semi_sparse._refusal(make(w))


def test_dense_weight_is_exact_for_the_cutlass_layout():
    w = (torch.randn(64, 128) * torch.tensor([0.0, 1.0, 1.0, 0.0]).repeat(32)).half()
    assert torch.equal(dense_weight(cutlass_on_cpu(w)), w)
    assert dense_weight(w) is w


# -- GPU: the real kernels -------------------------------------------------------------------

needs_sparse_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU of compute capability 8.0+")
# Big enough that the A100 profile's cost model puts gate/up and down on 2:4 at batch 256.
MID = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=16,
           num_key_value_heads=4)


def mid_llama(dtype=torch.float16) -> nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **{**BASE, **MID})
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def sparse_plan(model: nn.Module, dtype=torch.float16):
    """Planned for an A100 at batch 256 (applied on whatever sm_80+ GPU runs the test)."""
    p = hetero_llm.plan(model, hardware="a100-80gb", prune="2:4", batch_size=256, kernels="torch")
    assert any(on_sparse(e) for e in p.entries)
    return p


@pytest.mark.gpu
@needs_sparse_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_logits_match_the_dense_pruned_model(dtype):
    base = mid_llama(dtype)
    plan = sparse_plan(base)
    ref = hetero_llm.accelerate(copy.deepcopy(base), plan=without_sparse_kernels(plan))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = hetero_llm.accelerate(base, plan=plan)
    assert not [w for w in caught if "stay dense" in str(w.message)]  # every planned conversion succeeded
    targets = sparse_targets(plan)
    for name in targets:
        assert is_semi_sparse(model.get_submodule(name).weight), name
    x = torch.randint(3, 250, (4, 24), device="cuda")
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, ref(x).logits, **TOL[dtype])
        out = model.generate(x[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 1 and out.shape[1] > 8


@pytest.mark.gpu
@needs_sparse_gpu
def test_sparse_save_load_is_exact(tmp_path):
    base = mid_llama()
    model = hetero_llm.accelerate(base, plan=sparse_plan(base))
    hetero_llm.save(model, tmp_path / "m")
    for t in load_file(str(tmp_path / "m" / WEIGHTS)).values():
        assert type(t) is torch.Tensor
    loaded = hetero_llm.load(tmp_path / "m")
    for name in sparse_targets(model.hetero_plan):
        a, b = model.get_submodule(name).weight, loaded.get_submodule(name).weight
        assert is_semi_sparse(b) and torch.equal(dense_weight(a), dense_weight(b))
    x = torch.randint(3, 250, (2, 16), device="cuda")
    with torch.inference_mode():
        assert torch.equal(model(x).logits, loaded(x).logits)


@pytest.mark.gpu
@needs_sparse_gpu
def test_batch_one_plan_converts_nothing():
    base = mid_llama()
    plan = hetero_llm.plan(base, hardware="a100-80gb", prune="2:4", kernels="torch")
    model = hetero_llm.accelerate(base, plan=plan)
    assert not any(is_semi_sparse(p) for p in model.parameters())
