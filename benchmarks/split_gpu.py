"""Decode speed of a model larger than its GPU budget: hetero_llm's placement against
accelerate's own device_map offload, under the same forced budget.

    python benchmarks/split_gpu.py [--gpu-budget 6GiB] [--layers 32] [--new-tokens 64] [--rounds 3]
                                   [--json out.json]
    python benchmarks/split_gpu.py --smoke      # tiny model on the CPU: the code paths only

A Llama-3-8B-shaped model with random bf16 weights (about 16 GB, no download) is built once on
the CPU and copied: one copy goes through `hetero_llm.accelerate(model, max_memory={"cuda":
budget, "cpu": ...})`, the other through accelerate's `infer_auto_device_map(max_memory={0:
budget, "cpu": ...})` + `dispatch_model` (CPU-mapped modules are offloaded: streamed to the
GPU every step). Each round times greedy generate() of 1 token (the prefill) and of
`--new-tokens` tokens for both, alternating their order; decode tok/s = (new - 1) / (t_new - t_1),
median over rounds. Also printed: peak GPU memory of each during generate (both should stay near
the budget), the tokens' agreement, and the plan's predicted decode time and alternatives.
Time: accelerate's offload streams ~10 GB per token (seconds per token), so a default run takes
several minutes; lower --rounds or --new-tokens to fit a shorter slot.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
GIB = 2**30


def build(shape: dict, dtype: torch.dtype, fill_device: str):
    """Random weights without from_config's slow CPU init: each tensor drawn on `fill_device`."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=fill_device).manual_seed(0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            w = torch.empty(p.shape, dtype=dtype, device=fill_device)
            w.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else w.fill_(1.0)  # norms: ones
            module._parameters[name] = torch.nn.Parameter(w.cpu(), requires_grad=False)
    return model.eval()


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def hetero_variant(model, budget: int, cpu_budget: int, prompt: int, smoke: bool):
    """hetero_llm.accelerate under the budget: the planner splits the model (CPU compute or streaming)."""
    import hetero_llm

    options = dict(max_memory={"cuda": budget, "cpu": cpu_budget}, prompt_len=prompt)
    if not smoke:
        return hetero_llm.accelerate(model, **options)
    # Smoke: the plan an H100 would get for a GPU budget of half the model, one layer pinned to
    # stream, then run on the CPU (its GPU blocks relabelled) to go through split and offload.
    last = f"model.layers.{len(model.model.layers) - 1}"
    half = {"cuda": weight_bytes(model) // 2, "cpu": cpu_budget}
    plan = hetero_llm.plan(model, hardware="h100-80gb", kernels="torch", prompt_len=prompt, max_memory=half,
                           device_map={last: "offload"})
    assert plan.device_map and plan.offload == (last,), (plan.device_map, plan.offload)
    on_cpu = dataclasses.replace(plan, device="cpu", device_map={k: "cpu" for k in plan.device_map},
                                 entries=tuple(dataclasses.replace(e, device="cpu") for e in plan.entries))
    return hetero_llm.accelerate(model, plan=on_cpu)


def accelerate_variant(model, budget: int, cpu_budget: int, smoke: bool):
    from accelerate import dispatch_model, infer_auto_device_map

    max_memory = {"cpu": cpu_budget} if smoke else {0: budget, "cpu": cpu_budget}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map), device_map


def generate_s(model, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    """Seconds for a greedy generate() of exactly `new` tokens, and the tokens."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - start, out[0, ids.shape[1]:].cpu()


def time_decode(variants: dict, ids: torch.Tensor, new: int, rounds: int) -> dict:
    """Per variant: median prefill ms and decode tok/s over rounds (the variants' order alternating),
    peak GPU memory during generate, and the last round's tokens."""
    for model in variants.values():
        generate_s(model, ids, 2)  # warm up
    raw = {name: dict(prefill=[], decode=[], peak=0.0) for name in variants}
    for r in range(rounds):
        order = list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]
        for name, model in order:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t1, _ = generate_s(model, ids, 1)
            tn, raw[name]["tokens"] = generate_s(model, ids, new)
            raw[name]["prefill"].append(t1)
            raw[name]["decode"].append((new - 1) / (tn - t1) if tn > t1 else float("nan"))  # nan: noise won
            if torch.cuda.is_available():
                raw[name]["peak"] = max(raw[name]["peak"], torch.cuda.max_memory_allocated() / GIB)
            print(f"  round {r}: {name:<22} prefill {t1 * 1e3:8.1f} ms  decode {raw[name]['decode'][-1]:8.2f} tok/s",
                  flush=True)
    return {name: dict(prefill_ms=statistics.median(v["prefill"]) * 1e3, tok_s=statistics.median(v["decode"]),
                       tok_s_lo=min(v["decode"]), tok_s_hi=max(v["decode"]), peak_gib=v["peak"],
                       tokens=v["tokens"]) for name, v in raw.items()}


def parse_args(argv):
    from hetero_llm.config import parse_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-budget", default="6GiB")
    parser.add_argument("--cpu-budget", default="100GiB")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2 tokens, 1 round")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    args.gpu_budget, args.cpu_budget = parse_bytes("--gpu-budget", args.gpu_budget), parse_bytes(
        "--cpu-budget", args.cpu_budget)
    if args.smoke:
        args.new_tokens, args.rounds, args.prompt = 2, 1, 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("No CUDA GPU here: nothing to benchmark (run with --smoke to check the code paths on the CPU).")
        return 0
    gpu = "cpu" if args.smoke else "cuda:0"
    shape = TINY if args.smoke else {**LLAMA3_8B, "num_hidden_layers": args.layers}
    dtype = torch.float32 if args.smoke else torch.bfloat16
    args.layers = shape["num_hidden_layers"]
    t0 = time.perf_counter()
    base = build(shape, dtype, "cpu" if args.smoke else "cuda")
    print(f"model: {weight_bytes(base) / GIB:.2f} GiB of {dtype} weights, GPU budget {args.gpu_budget / GIB:.2f} GiB "
          f"(built in {time.perf_counter() - t0:.0f} s)", flush=True)
    ours = hetero_variant(copy.deepcopy(base), args.gpu_budget, args.cpu_budget, args.prompt, args.smoke)
    theirs, their_map = accelerate_variant(base, args.gpu_budget, args.cpu_budget, args.smoke)
    plan = ours.hetero_plan
    ids = torch.randint(3, shape["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(gpu)
    variants = {"hetero_llm": ours, "accelerate-offload": theirs}
    result = report(args, plan, their_map, time_decode(variants, ids, args.new_tokens, args.rounds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def report(args, plan, their_map, times) -> dict:
    # bf16 on CPU and GPU kernels round differently: the greedy tokens agree mostly, not exactly
    tokens = [t.pop("tokens") for t in times.values()]
    agreement = float((tokens[0] == tokens[1]).float().mean())
    ratio = times["hetero_llm"]["tok_s"] / times["accelerate-offload"]["tok_s"]
    pred = plan.prediction
    ours_map = {d: sum(1 for v in plan.device_map.values() if v == d) for d in set(plan.device_map.values())}
    theirs = {str(d): sum(1 for v in their_map.values() if v == d) for d in set(their_map.values())}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
    print(f"{device}; torch {torch.__version__}")
    print(f"hetero_llm plan: blocks per device {ours_map}, streamed {list(plan.offload)}; {'; '.join(plan.notes)}")
    print(f"accelerate device_map: modules per device {theirs}")
    for name, t in times.items():
        print(f"{name:<20} decode {t['tok_s']:8.2f} tok/s (spread {t['tok_s_lo']:.2f}-{t['tok_s_hi']:.2f})  "
              f"prefill {t['prefill_ms']:8.1f} ms  peak GPU {t['peak_gib']:.2f} GiB")
    print(f"hetero_llm / accelerate-offload decode: {ratio:.2f}x; greedy tokens agree {agreement:.0%}")
    predicted = {}
    if pred is not None:
        predicted = dict(decode_ms_after=pred.decode_ms_after, alternatives=dict(pred.alternatives))
        tok_s = 1e3 / max(pred.decode_ms_after, 1e-9)
        print(f"plan predicted decode {pred.decode_ms_after:.2f} ms/step ({tok_s:.1f} tok/s); "
              f"alternatives (ms/step): {predicted['alternatives']}")
    return dict(device=device, layers=args.layers, gpu_budget=args.gpu_budget, new_tokens=args.new_tokens,
                rounds=args.rounds, times=times, ratio=ratio, greedy_agree=agreement,
                plan_blocks_per_device=ours_map, offload=list(plan.offload), accelerate_map=theirs,
                predicted=predicted, notes=list(plan.notes))


if __name__ == "__main__":
    sys.exit(main())
