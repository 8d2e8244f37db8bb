"""A 1B-class Llama shape on the CPU: original fp32 vs hetero_llm INT8, decode, prefill and memory.

Random weights from a config (hidden 2048, 16 layers, 32 query / 8 KV heads, MLP 8192: 1.1B
parameters with SmolLM2's 49152-token vocabulary, so its tokenizer makes the prompts). Decode:
greedy `--new-tokens` after a short prompt; prefill: `--prompt-len` tokens; medians of interleaved
rounds; greedy-token agreement with the original over the bench prompt (on random weights the
top tokens are near ties, so agreement is lower than on a trained model). Peak RSS of each phase
is printed too.

    python benchmarks/cpu_1b_shape.py [--repeats 3] [--layers 16]
"""
import argparse
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hetero_llm
from hetero_llm.evaluate import format_table, load_model, run_bench

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--layers", type=int, default=16)
parser.add_argument("--new-tokens", type=int, default=32)
parser.add_argument("--prompt-len", type=int, default=128)
args = parser.parse_args()


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


tokenizer = load_model("smollm2")[1]
config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=49152,
                     max_position_embeddings=4096, tie_word_embeddings=False)
torch.manual_seed(0)
start = time.perf_counter()
original = LlamaForCausalLM(config).eval()
print(f"built {sum(p.numel() for p in original.parameters()) / 1e9:.2f}B parameters in "
      f"{time.perf_counter() - start:.0f} s; peak RSS {peak_gb():.1f} GB")
copy = LlamaForCausalLM(config).eval()
copy.load_state_dict(original.state_dict())
start = time.perf_counter()
accelerated = hetero_llm.accelerate(copy)
print(f"accelerate() took {time.perf_counter() - start:.0f} s; peak RSS {peak_gb():.1f} GB")
result = run_bench({"original": original, "hetero_llm": accelerated}, tokenizer, repeats=args.repeats,
                   new_tokens=args.new_tokens, prompt_len=args.prompt_len, perplexity_tokens=0,
                   model_name=f"llama-shape-{args.layers}L-2048")
print(format_table(result))
# Random weights make greedy tokens near ties; the logits say how close the two models are.
ids = tokenizer("The three primary colors are red, yellow and", return_tensors="pt").input_ids
with torch.inference_mode():
    want, got = original(ids).logits.float(), accelerated(ids).logits.float()
spread = (want - want.mean(dim=-1, keepdim=True)).norm()
print(f"logits: relative error {((got - want).norm() / spread).item():.4f} of their spread; "
      f"top-1 equal at {(got.argmax(-1) == want.argmax(-1)).float().mean().item():.1%} of positions")
print(f"peak RSS of the process {peak_gb():.1f} GB")
