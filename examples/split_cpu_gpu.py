"""Plan a model that does not fit in GPU memory: a CPU+GPU split, costed against accelerate's offload.

Runs anywhere (the model is on the meta device, the hardware a named profile). On a machine with
a GPU, `hetero_llm.accelerate(model, max_memory=...)` applies the same kind of plan to real weights.

    python examples/split_cpu_gpu.py
"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hetero_llm
from hetero_llm.config import QuantConfig

# A Llama-3-8B-shaped model without weights.
config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)

# 16 GB of bf16 weights, 6 GiB of GPU allowed: the planner moves the first layers off the GPU and
# costs computing them on the CPU (INT8) against streaming them to the GPU every step.
plan = hetero_llm.plan(model, hardware="h100-80gb", max_memory={"cuda": "6GiB"})
print(plan)
p = plan.prediction
ours, theirs = p.decode_ms_after, p.alternatives["accelerate device_map, same budget"]
print(f"\npredicted: {1e3 / ours:.1f} tok/s vs accelerate's offload {1e3 / theirs:.1f} tok/s ({theirs / ours:.1f}x)")

# Pins: keep the last layer on the GPU whatever the budget says, stream layer 30, keep down_proj in bf16.
pinned = hetero_llm.plan(model, hardware="h100-80gb", max_memory={"cuda": "6GiB"},
                         device_map={"model.layers.31": "cuda:0", "model.layers.30": "offload"},
                         quantize=QuantConfig(overrides={"*.mlp.down_proj": "none"}))
print("\nlayer 30:", pinned.device_map["model.layers.30"], "offloaded:", "model.layers.30" in pinned.offload)
