"""The fused kernels on their own, and inside a model.

    python examples/fused_kernels.py                      # GPU: Triton kernels; CPU: torch paths
    TRITON_INTERPRET=1 python examples/fused_kernels.py   # CPU: the Triton kernels, interpreted (slow)

The four public functions take ordinary tensors and work on any device: on a CUDA GPU with
Triton they launch the Triton kernels, elsewhere they run the same math with torch ops. Under
TRITON_INTERPRET=1 (set before anything imports triton) the model below is accelerated with
kernels="triton" on the CPU, which runs every kernel in Triton's interpreter: a way to debug
them without a GPU.
"""
from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hetero_llm
from hetero_llm.kernels import attention, decode_attention, linear_add, rms_norm

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
g = torch.Generator(device=device).manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g, device=device, dtype=dtype)


# Prefill: 2 sequences of 97 tokens, 8 query heads sharing 2 kv heads (GQA), head_dim 128;
# the first sequence is left-padded by 5 tokens.
q, k, v = randn(2, 8, 97, 128), randn(2, 2, 97, 128), randn(2, 2, 97, 128)
keep = torch.ones(2, 1, 1, 97, dtype=torch.bool, device=device)
keep[0, ..., :5] = False
out = attention(q, k, v, causal=True, attn_mask=keep)
print("attention", tuple(out.shape), "finite:", bool(out.isfinite().all()))

# Decode: one new token per sequence against a cache of 1024 slots holding 1000 and 17 tokens.
k_cache, v_cache = randn(2, 2, 1024, 128), randn(2, 2, 1024, 128)
lens = torch.tensor([1000, 17], device=device, dtype=torch.int32)
print("decode_attention", tuple(decode_attention(randn(2, 8, 1, 128), k_cache, v_cache, lens).shape))

# MatMul + bias + residual in one kernel, and RMSNorm after a residual add.
x, w, b, r = randn(16, 512), randn(256, 512) / 512 ** 0.5, randn(256), randn(16, 256)
y = linear_add(x, w, b, r)
normed, new_residual = rms_norm(y, torch.ones(256, device=device, dtype=dtype), 1e-5, residual=r)
print("linear_add", tuple(y.shape), "| rms_norm with residual", tuple(normed.shape), tuple(new_residual.shape))

# Inside a model: accelerate() picks the kernels by itself on a GPU ("auto"); here a tiny
# random Llama so the example needs no download.
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()
kernels = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "auto"
model = hetero_llm.accelerate(model, kernels=kernels, quantize="none", device=device)
print(model.hetero_plan.table())
ids = torch.randint(1, 256, (1, 12), device=device)
print("generated:", model.generate(ids, max_new_tokens=8, do_sample=False)[0, 12:].tolist())
