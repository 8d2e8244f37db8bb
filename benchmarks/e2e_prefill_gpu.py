"""End-to-end prefill on the GPU: a Llama-3-8B-shaped model (random bf16 weights, no download),
transformers with SDPA against the same weights after hetero_llm.accelerate().

    python benchmarks/e2e_prefill_gpu.py [--tokens 2048] [--rounds 5] [--layers 32] [--json out.json]

One forward over a `--tokens` prompt at batch 1, keeping the last position's logits (what
generate() does for its first token). Both models live on the GPU at once (2 x 16 GB), and
their runs alternate round by round; each round's time is do_bench's median (CUDA events).
The accelerated model is a deep copy, so both sides hold identical weights; the logits are
compared (max |diff| / max |ref|) and the greedy next token of every prompt position checked.
Target (issue 4): accelerated >= 1.2x transformers with SDPA.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
from gpu_common import gpu_ready, interleaved, rel_err

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def build(layers: int, shape: dict = LLAMA3_8B, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A Llama model of `shape` with `layers` decoder layers, random weights (seed 0), built on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**shape, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not gpu_ready():
        return 0
    import hetero_llm

    ref = build(args.layers)
    ours = hetero_llm.accelerate(copy.deepcopy(ref))
    kinds = sorted({e.kernel for e in ours.hetero_plan.entries if e.action != "keep"})
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; plan kernels: {', '.join(kinds)}")
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))

    def forward(model, keep=1):
        with torch.inference_mode():
            return model(ids, logits_to_keep=keep, use_cache=False).logits

    t = interleaved({"transformers-sdpa": lambda: forward(ref), "hetero_llm": lambda: forward(ours)},
                    args.rounds, rep_ms=400)
    want, got = forward(ref, keep=0), forward(ours, keep=0)
    agree = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    err = rel_err(got[:, -1], want[:, -1].float())
    speedup = t["transformers-sdpa"]["ms"] / t["hetero_llm"]["ms"]
    tok_s = {k: args.tokens / (v["ms"] / 1e3) for k, v in t.items()}
    for name, r in t.items():
        print(f"{name:<18} {r['ms']:9.2f} ms (spread {r['lo']:.2f}-{r['hi']:.2f})  {tok_s[name]:10.0f} tok/s")
    print(f"speedup {speedup:.2f}x (target >= 1.2x: {'MET' if speedup >= 1.2 else 'MISSED'}); "
          f"last-token logits rel err {err:.2e}; greedy tokens agree at {agree:.1%} of positions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), tokens=args.tokens, layers=args.layers,
                           times=t, tok_s=tok_s, speedup=speedup, logits_rel_err=err, greedy_agree=agree,
                           kernels=kinds), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
