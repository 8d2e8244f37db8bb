"""The planner's decisions: per device, per option, per architecture; meta models; speed."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import hetero_llm
from hetero_llm import HardwareError, KernelConfig, Options, QuantConfig, hardware_profile
from hetero_llm.hardware import TritonInfo
from hetero_llm.kernels.cpu_vnni import vnni_possible
from hetero_llm.quant.modules import linear_weight
from hetero_llm.quant.backends import int8pack_available
from tiny_shapes import TINY_SHAPES

PLAN_SECONDS_LIMIT = 5.0  # a 70B-shaped model, planned on meta

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SHAPES = TINY_SHAPES
LINEARS_PER_BLOCK = {"llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 7, "gemma": 7, "phi3": 4, "gpt2": 4, "opt": 6}
CPU_INT8PACK = "cpu-int8pack" if int8pack_available() else "torch-dequant"


def cpu_int8_kernel(in_features: int) -> str:
    """The weight-only kernel the planner picks on this CPU for a symmetric layer."""
    if CPU_INT8PACK == "cpu-int8pack" and in_features % 64 == 0 and vnni_possible():
        return "cpu-vnni"
    return CPU_INT8PACK


def build(model_type: str = "llama", meta: bool = True, **overrides):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **SHAPES[model_type], **overrides})
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    return AutoModelForCausalLM.from_config(cfg).eval()


def base_kernel(e) -> str:
    return e.kernel.split("+", 1)[0]


@pytest.mark.parametrize("model_type", SHAPES)
def test_meta_plan_equals_real_plan(model_type):
    meta = hetero_llm.plan(build(model_type, meta=True), hardware="cpu-2core")
    real = hetero_llm.plan(build(model_type, meta=False), hardware="cpu-2core")
    assert meta == real


@pytest.mark.parametrize("model_type", SHAPES)
def test_cpu_default_quantizes_every_linear(model_type):
    p = hetero_llm.plan(build(model_type), hardware="cpu-2core")
    assert p.family == model_type and p.device == "cpu"
    q = [e for e in p.by_action("quantize") if e.role != "embed"]
    assert len(q) == 2 * LINEARS_PER_BLOCK[model_type] + 1  # + lm_head
    model = build(model_type)
    for e in q:
        in_features = linear_weight(model.get_submodule(e.name)).shape[1]
        assert e.quant == "int8" and base_kernel(e) == cpu_int8_kernel(in_features), e
    assert all("memory-bound" in e.reason or "tied to the embedding" in e.reason for e in q)
    # Tiny linears cost their fixed per-call time, which INT8 does not shrink: only positive here.
    assert all(e.decode_us_after > 0 for e in q)
    (embed,) = [e for e in p.entries if e.role == "embed"]
    plain = embed.module_type == "Embedding" or embed.module_type.endswith("ScaledWordEmbedding")
    assert (embed.action, embed.quant) == (("quantize", "int8") if plain else ("keep", None))
    assert p.prediction.weight_mb_after < p.prediction.weight_mb_before / 2  # speed: see the larger models below
    assert p.options == Options.from_kwargs().to_dict()
    assert p.hardware == hardware_profile("cpu-2core").to_dict()


def test_roles_and_fusions_llama():
    p = hetero_llm.plan(build("llama"), hardware="cpu-2core")
    roles = {e.name: e.role for e in p.entries}
    for rel, role in {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                      "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
                      "mlp.down_proj": "down", "input_layernorm": "attn_norm",
                      "post_attention_layernorm": "mlp_norm", "self_attn": "attention"}.items():
        assert roles[f"model.layers.1.{rel}"] == role
    assert roles["lm_head"] == "lm_head" and roles["model.norm"] == "final_norm"
    assert roles["model.embed_tokens"] == "embed"
    kinds = sorted((f.name, f.kind, f.members) for f in p.fusions)
    expected = []
    for i in range(2):
        b = f"model.layers.{i}"
        expected += [(f"{b}.mlp", "gated_mlp", (f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj")),
                     (f"{b}.self_attn", "rotary_attention",
                      (f"{b}.self_attn.q_proj", f"{b}.self_attn.k_proj", f"{b}.self_attn.v_proj"))]
    assert kinds == sorted(expected)
    attn = p.entry("model.layers.0.self_attn")
    assert attn.action == "swap" and attn.kernel == "sdpa+rotary"
    for name in ("model.layers.0.input_layernorm", "model.norm"):
        assert p.entry(name).action == "swap" and p.entry(name).kernel == "torch-rms_norm"
    assert p.model_settings == {"attn_implementation": "sdpa", "kernels": "torch", "decode": "native"}


def test_opt_fuses_qkv_and_keeps_layernorm():
    p = hetero_llm.plan(build("opt"), hardware="cpu-2core")
    assert [f.kind for f in p.fusions] == ["qkv", "qkv"]
    assert p.fusions[0].members == tuple(f"model.decoder.layers.0.self_attn.{x}_proj" for x in "qkv")
    ln = p.entry("model.decoder.layers.0.self_attn_layer_norm")
    assert ln.action == "keep" and "LayerNorm" in ln.reason


def test_gpt2_tied_lm_head():
    p = hetero_llm.plan(build("gpt2"), hardware="cpu-2core")
    assert p.entry("transformer.h.0.attn.c_attn").role == "qkv"
    assert p.entry("transformer.h.0.mlp.c_fc").role == "fc_in"
    head = p.entry("lm_head")
    assert head.action == "quantize" and "tied" in head.reason
    assert not p.fusions


def test_gpu_auto_keeps_floating_point():
    p = hetero_llm.plan(build("llama"), hardware="h100-80gb")
    assert p.device == "cuda"
    assert not p.by_action("quantize")
    linears = [e for e in p.entries if e.role in ("q", "k", "v", "gate", "up", "lm_head")]
    assert linears and all(e.action == "keep" and "GPU" in e.reason for e in linears)
    # o and down stay bf16 too; their residual adds move into the matmul's epilogue
    residual = [e for e in p.entries if e.role in ("o", "down")]
    assert residual and all(e.action == "swap" and e.kernel == "triton-linear_add" and e.quant is None
                            for e in residual)
    assert p.prediction.weight_mb_after == pytest.approx(p.prediction.weight_mb_before)


def linears_quantized(p) -> list:
    """Quantized linears (the embedding has its own lookup kernel)."""
    return [e for e in p.by_action("quantize") if e.role != "embed"]


def test_explicit_int8_on_gpu_uses_triton_kernels_where_triton_runs():
    p = hetero_llm.plan(build("llama"), hardware="h100-80gb", quantize="int8")
    q = linears_quantized(p)
    assert q and all(base_kernel(e) == "triton-int8" for e in q)
    w = hetero_llm.plan(build("llama"), hardware="h100-80gb", quantize=QuantConfig(scheme="w8a8", smooth_alpha=0))
    assert {base_kernel(e) for e in linears_quantized(w)} == {"triton-w8a8", "triton-int8"}  # lm_head weight-only
    no_triton = dataclasses.replace(hardware_profile("h100-80gb"), triton=TritonInfo(False, None, False))
    r = hetero_llm.plan(build("llama"), hardware=no_triton, quantize="int8")
    assert all(base_kernel(e) == "torch-dequant" and "no Triton" in e.reason for e in linears_quantized(r))


def test_device_option_overrides_hardware_default():
    p = hetero_llm.plan(build("llama"), hardware="h100-80gb", device="cpu")
    assert p.device == "cpu" and p.by_action("quantize")
    with pytest.raises(HardwareError, match="no CUDA GPU"):
        hetero_llm.plan(build("llama"), hardware="cpu-2core", device="cuda")


def test_hardware_object_is_accepted():
    hw = hardware_profile("cpu-8core-32gb")
    assert hetero_llm.plan(build("llama"), hardware=hw).hardware == hw.to_dict()


def test_odd_in_features_use_reference_kernel_with_reason():
    p = hetero_llm.plan(build("llama", hidden_size=40, intermediate_size=96), hardware="cpu-2core")
    q_proj = p.entry("model.layers.0.self_attn.q_proj")  # in 40
    down = p.entry("model.layers.0.mlp.down_proj")  # in 96
    assert base_kernel(q_proj) == "torch-dequant" and "multiple of 16" in q_proj.reason
    assert base_kernel(down) == cpu_int8_kernel(96)


@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
def test_explicit_scheme_is_recorded(scheme):
    p = hetero_llm.plan(build("llama"), hardware="cpu-2core", quantize=scheme)
    q = [e for e in linears_quantized(p) if "tied to the embedding" not in e.reason]
    assert q and all(e.quant == scheme and f"quantize={scheme!r}" in e.reason for e in q)


def test_quantize_none():
    p = hetero_llm.plan(build("llama"), hardware="cpu-2core", quantize="none")
    assert not p.by_action("quantize")
    assert p.entry("lm_head").action == "keep" and "quantize='none'" in p.entry("lm_head").reason
    assert p.fusions  # fusions do not depend on quantization
    assert p.prediction.weight_mb_after == pytest.approx(p.prediction.weight_mb_before)


def test_lm_head_can_stay_in_floating_point():
    p = hetero_llm.plan(build("llama"), hardware="cpu-2core", quantize=QuantConfig(lm_head=False))
    head = p.entry("lm_head")
    assert head.action == "keep" and "lm_head=False" in head.reason
    assert p.entry("model.layers.0.self_attn.o_proj").action == "quantize"


def test_kernels_torch_uses_reference_int8_path():
    p = hetero_llm.plan(build("llama"), hardware="cpu-2core", kernels="torch")
    q = linears_quantized(p)
    assert q and all(base_kernel(e) == "torch-dequant" and "kernels='torch'" in e.reason for e in q)


def test_fusion_switches():
    p = hetero_llm.plan(build("llama"), hardware="cpu-2core",
                        kernels=KernelConfig(fuse_projections=False, fuse_norms=False))
    assert not p.fusions
    assert all("fused" not in e.kernel for e in p.entries)
    norm = p.entry("model.layers.0.input_layernorm")
    assert norm.action == "keep" and "fuse_norms=False" in norm.reason
    assert p.entry("model.layers.0.self_attn").action == "keep"


def test_fusions_do_not_depend_on_lm_head_or_kernel_choice():
    p = hetero_llm.plan(build("llama"), hardware="cpu-2core", quantize=QuantConfig(lm_head=False))
    assert len(p.fusions) == 4
    # in_features 40: every member runs the reference kernel, alike, so they still fuse
    odd = hetero_llm.plan(build("llama", hidden_size=40), hardware="cpu-2core")
    assert sorted(f.kind for f in odd.fusions) == ["gated_mlp", "gated_mlp", "rotary_attention", "rotary_attention"]
    assert odd.entry("model.layers.0.self_attn.k_proj").kernel == "torch-dequant+fused:rotary_attention"


def test_planning_is_deterministic():
    model = build("qwen2")
    assert hetero_llm.plan(model, hardware="cpu-2core") == hetero_llm.plan(model, hardware="cpu-2core")


def test_unknown_architecture_non_strict_plan():
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=256, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    p = hetero_llm.plan(model, hardware="cpu-2core", strict=False)
    assert p.family is None and not p.fusions
    assert {e.role for e in p.by_action("quantize")} == {"linear"}
    assert all(e.action == "skip" for e in p.entries if e.role != "linear")
    assert p.notes and "no role table" in p.notes[0]


LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256)


@pytest.fixture(scope="module")
def llama_70b():
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_70B))


@pytest.mark.parametrize("hardware", ["h100-80gb", "cpu-32core"])
def test_70b_plans_quickly_on_meta(llama_70b, hardware):
    start = time.perf_counter()
    p = hetero_llm.plan(llama_70b, hardware=hardware)
    elapsed = time.perf_counter() - start
    assert elapsed < PLAN_SECONDS_LIMIT, f"planning took {elapsed:.1f}s"
    assert len(p.entries) > 80 * 10
    assert p.entry("model.layers.79.mlp.down_proj").params == 8192 * 28672
    # ~70B parameters (fp32 on meta), from shapes alone
    params = p.prediction.weight_mb_before * 2**20 / 4
    assert 68e9 < params < 72e9
    if hardware.startswith("cpu"):
        assert p.device == "cpu" and p.prediction.decode_speedup > 3
        assert p.prediction.weight_mb_after < p.prediction.weight_mb_before / 3
    else:
        assert p.device == "cuda"
    assert all(t.device.type == "meta" for t in llama_70b.parameters())


# -- the kernel backend: Triton's fused kernels on GPUs ------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma"])
def test_gpu_plan_uses_triton_kernels_and_fuses_residual_adds(model_type):
    p = hetero_llm.plan(build(model_type), hardware="h100-80gb")
    # Mistral's config has a sliding window by default: transformers' loop decodes it
    decode = "transformers" if model_type == "mistral" else "cuda_graph"
    assert p.model_settings == {"attn_implementation": "hetero_llm", "kernels": "triton", "decode": decode}
    norms = [e for e in p.entries if e.role in ("attn_norm", "mlp_norm", "final_norm")]
    assert norms and all(e.kernel == "triton-rms_norm" for e in norms)
    attn = [e for e in p.entries if e.role == "attention"]
    assert attn and all(e.kernel == "triton-attention+rotary" for e in attn)
    layers = [f for f in p.fusions if f.kind == "decoder_layer"]
    assert [f.name for f in layers] == ["model.layers.0", "model.layers.1"]
    assert layers[0].members == ("model.layers.0.self_attn", "model.layers.0.mlp",
                                 "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm")
    assert hetero_llm.Plan.from_json(p.to_json()) == p
    assert "split-KV flash decoding" in p.entry("model.layers.0.self_attn").reason


def test_gpu_int8_plan_fuses_the_attention_residual_into_the_norm():
    p = hetero_llm.plan(build("llama"), hardware="h100-80gb", quantize="int8")
    assert base_kernel(p.entry("model.layers.0.self_attn.o_proj")) == "triton-int8"
    assert p.entry("model.layers.0.post_attention_layernorm").kernel == "triton-add_rms_norm"
    assert p.entry("model.layers.0.input_layernorm").kernel == "triton-rms_norm"


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "phi3"])
def test_gpu_plan_routes_other_attention_through_the_interface(model_type):
    p = hetero_llm.plan(build(model_type), hardware="h100-80gb")
    assert p.model_settings["attn_implementation"] == "hetero_llm"
    attn = [e for e in p.entries if e.role == "attention"]
    assert attn and all(e.kernel == "triton-attention" and e.action == "swap" for e in attn)
    assert not [f for f in p.fusions if f.kind == "decoder_layer"]  # their blocks are not Llama-style


def test_kernels_torch_on_gpu_keeps_torch_ops():
    p = hetero_llm.plan(build("llama"), hardware="h100-80gb", kernels="torch")
    # the decode step runs torch's ops as well, captured as a CUDA graph all the same
    assert p.model_settings == {"attn_implementation": "sdpa", "kernels": "torch", "decode": "cuda_graph"}
    assert not any(e.kernel.startswith("triton") for e in p.entries)
    assert not [f for f in p.fusions if f.kind == "decoder_layer"]


def test_kernels_triton_on_a_gpu_without_triton_is_refused():
    no_triton = dataclasses.replace(hardware_profile("h100-80gb"), triton=TritonInfo(False, None, False))
    with pytest.raises(HardwareError, match="cannot compile Triton"):
        hetero_llm.plan(build("llama"), hardware=no_triton, kernels="triton")
    auto = hetero_llm.plan(build("llama"), hardware=no_triton)
    assert auto.model_settings["kernels"] == "torch"


def test_editing_a_block_member_drops_its_decoder_layer_fusion():
    p = hetero_llm.plan(build("llama"), hardware="h100-80gb")
    edited = p.with_entry("model.layers.0.post_attention_layernorm", kernel="torch-rms_norm")
    assert [f.name for f in edited.fusions if f.kind == "decoder_layer"] == ["model.layers.1"]
