"""Plan a Llama-3-70B-shaped model for hardware you do not have, on the meta device.

    python examples/plan_for_other_hardware.py
"""
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hetero_llm

config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
with torch.device("meta"):                 # no memory for weights is allocated
    model = AutoModelForCausalLM.from_config(config)

for profile in ("h100-80gb", "cpu-32core-256gb"):
    start = time.perf_counter()
    plan = hetero_llm.plan(model, hardware=profile)
    print(plan.table().split("\n\n")[0])   # the header: device, predictions, counts
    print(f"planned in {time.perf_counter() - start:.2f} s\n")
