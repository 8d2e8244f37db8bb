"""Placement decisions of the cost model on meta models of any size: CPU+GPU splits under
memory budgets, streaming vs computing on the CPU, pins, multi-GPU, and planning speed."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hetero_llm
from hetero_llm.config import QuantConfig
from hetero_llm.hardware import PROFILES, hardware_profile

GIB = 2**30


def llama(layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int = 128256) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def llama8b():
    return llama(32, 4096, 14336, 32, 8)


@pytest.fixture(scope="module")
def llama70b():
    return llama(80, 8192, 28672, 64, 8)


@pytest.mark.parametrize("profile", [*PROFILES, "cpu-32core-256gb", "h100-80gbx8"])
def test_70b_meta_model_plans_in_seconds_for_every_profile(profile):
    start = time.perf_counter()
    model = llama(80, 8192, 28672, 64, 8)
    p = hetero_llm.plan(model, hardware=profile)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"planning took {elapsed:.2f} s"
    assert len(p.entries) > 80 * 9 and p.prediction.decode_ms_after > 0
    if profile.startswith("cpu"):
        assert not p.device_map
    else:  # 70B in bf16 (~131 GiB) exceeds every single GPU's budget
        assert p.device_map and p.prediction.alternatives


def test_split_under_a_small_gpu_budget_beats_accelerate_offload(llama8b):
    p = hetero_llm.plan(llama8b, hardware="h100-80gb", max_memory={"cuda": "6GiB"})
    devices = [p.device_map[f"model.layers.{i}"] for i in range(32)]
    n_cpu = devices.count("cpu")
    assert 0 < n_cpu < 32
    assert devices == ["cpu"] * n_cpu + ["cuda:0"] * (32 - n_cpu)  # one contiguous CPU prefix: one crossing
    assert p.device_map["lm_head"] == "cuda:0" and p.device_map["model.embed_tokens"] == "cpu"
    # CPU layers carry the CPU's plan (INT8 on the CPU kernels); GPU layers keep bf16 + Triton
    cpu_q = p.entry("model.layers.0.self_attn.o_proj")
    gpu_q = p.entry("model.layers.31.self_attn.o_proj")
    assert cpu_q.device == "cpu" and cpu_q.quant == "int8" and "over the GPU budget" in p.entry(
        "model.layers.0.self_attn").reason
    assert gpu_q.device == "cuda:0" and gpu_q.quant is None
    assert not p.offload
    accel = p.prediction.alternatives["accelerate device_map, same budget"]
    assert accel / p.prediction.decode_ms_after >= 1.5  # the target, predicted
    assert "moved layers streamed to the GPU (pinned)" in p.prediction.alternatives
    gpu_weights = sum(e.params * 2 for e in p.entries if e.device == "cuda:0" and e.role != "attention")
    assert gpu_weights <= 6 * GIB
    assert "split across devices" in p.table()


def test_fits_means_no_split(llama8b):
    p = hetero_llm.plan(llama8b, hardware="h100-80gb")
    assert not p.device_map and not p.offload


def test_slow_cpu_streams_instead_of_computing(llama8b):
    hw = hardware_profile("h100-80gb")
    weak = dataclasses.replace(hw.cpu, memory_bandwidth_gbs=2.0, physical_cores=1, logical_cores=1)
    p = hetero_llm.plan(llama8b, hardware=dataclasses.replace(hw, cpu=weak), max_memory={"cuda": "10GiB"})
    assert p.offload and all(p.device_map[f"model.layers.{i}"] == "cuda:0" for i in range(32))
    assert "streamed to the GPU each step" in p.entry(f"{p.offload[-1]}.self_attn").reason
    assert "moved layers computed on the CPU" in p.prediction.alternatives


def test_pins_are_kept(llama8b):
    p = hetero_llm.plan(llama8b, hardware="h100-80gb",
                        device_map={"model.layers.5": "cpu", "model.layers.6": "offload"})
    assert p.device_map["model.layers.5"] == "cpu" and p.entry("model.layers.5.mlp.down_proj").device == "cpu"
    assert p.offload == ("model.layers.6",)
    assert {p.device_map[f"model.layers.{i}"] for i in range(32) if i not in (5, 6)} == {"cuda:0"}


def test_multi_gpu_fills_gpus_in_order_and_predicts_tensor_parallel(llama70b):
    p = hetero_llm.plan(llama70b, hardware="h100-80gbx4")
    used = [p.device_map[f"model.layers.{i}"] for i in range(80)]
    assert "cpu" not in used and used == sorted(used) and set(used) == {"cuda:0", "cuda:1"}
    tp = {k: v for k, v in p.prediction.alternatives.items() if k.startswith("tp=")}
    assert set(tp) == {"tp=2 over torchrun, all on GPUs", "tp=4 over torchrun, all on GPUs"}
    assert tp["tp=4 over torchrun, all on GPUs"] < tp["tp=2 over torchrun, all on GPUs"] < p.prediction.decode_ms_after


def test_scheme_pins_per_module():
    model = llama(2, 576, 1536, 9, 3, vocab=49152)
    p = hetero_llm.plan(model, hardware="cpu-2core", quantize=QuantConfig(overrides={"*.mlp.down_proj": "none",
                                                                                     "lm_head": "int8-asym"}))
    assert p.entry("model.layers.0.mlp.down_proj").action == "keep"
    assert "pinned" in p.entry("model.layers.1.mlp.down_proj").reason
    assert p.entry("model.layers.0.mlp.up_proj").quant == "int8"
    assert p.entry("lm_head").quant == "int8-asym"


def test_auto_picks_w8a8_only_where_compute_bound():
    model = llama(2, 2048, 8192, 16, 4, vocab=32000)
    decode = hetero_llm.plan(model, hardware="cpu-2core")
    assert not [e for e in decode.entries if e.quant == "w8a8"]
    batched = hetero_llm.plan(model, hardware="cpu-2core", batch_size=256)
    w8a8 = {e.role for e in batched.entries if e.quant == "w8a8"}
    assert w8a8 and w8a8 <= {"q", "k", "v", "gate", "up"}
    assert batched.entry("model.layers.0.mlp.down_proj").quant == "int8"  # outliers: weight-only
    assert "compute-bound at batch 256" in batched.entry("model.layers.0.mlp.up_proj").reason


def test_kernel_per_op_is_the_fastest_predicted():
    model = llama(1, 2048, 8192, 16, 4, vocab=32000)
    p = hetero_llm.plan(model, hardware="cpu-2core")
    e = p.entry("model.layers.0.mlp.down_proj")
    assert "fastest predicted" in e.reason and e.kernel.split("+")[0] in ("cpu-vnni", "cpu-int8pack")
