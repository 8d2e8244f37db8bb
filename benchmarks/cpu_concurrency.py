"""One accelerated SmolLM2 serving 8 threads at once, against the same 8 calls made one at a time.

    python benchmarks/cpu_concurrency.py [--threads 8] [--tokens 32] [--rounds 3] [--json PATH]

Each of `--threads` chat prompts (different questions, so different lengths) is decoded greedily
for exactly `--tokens` new tokens. Several ways, interleaved round by round (order reversed every
other round), medians over rounds:
  sequential      the main thread makes the calls one after another
  threads         one thread per call, all released together (what a threaded server does)
  threads 1-op    the same with torch.set_num_threads(1) (no intra-op parallelism)
  2 workers 1-op  two threads, each making half the calls in turn, torch.set_num_threads(1)
  batched         one generate() of all prompts, left-padded (what a batching server does)
Throughput = new tokens of all calls / wall time. The threaded outputs must equal the
sequential ones token for token (checked every round); the batched ones are reported as the
share of identical tokens (padding changes the arithmetic slightly).
Issue 9's target: outputs identical to sequential calls; throughput reported against one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import hetero_llm
from hetero_llm.evaluate import load_model
from hetero_llm.serving.text import prompt_ids

QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain recursion in one sentence.",
             "List three prime numbers.", "What does a compiler do?", "Name a famous painter and one of their works.",
             "How many legs does a spider have?", "Give me a synonym for happy.", "Why is the sky blue?",
             "Translate 'good morning' into Spanish.", "What is 12 times 12?", "Describe a cat in five words."]


def generate(model, ids, tokens: int, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def run_threads(model, prompts, tokens):
    out, barrier = [None] * len(prompts), threading.Barrier(len(prompts))

    def work(i):
        barrier.wait()
        out[i] = generate(model, prompts[i], tokens)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def one_op_thread(fn):
    """fn() with torch's intra-op threads set to 1 (a process-wide setting), restored after."""
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def run_workers(model, prompts, tokens, workers: int = 2):
    """`workers` threads, each generating its share of the prompts one after another."""
    out, barrier = [None] * len(prompts), threading.Barrier(workers)

    def work(w):
        barrier.wait()
        for i in range(w, len(prompts), workers):
            out[i] = generate(model, prompts[i], tokens)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def run_batched(model, tokenizer, prompts, tokens):
    """All prompts in one left-padded batch; returns each row's new tokens."""
    width = max(p.shape[1] for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1]:], mask[i, width - p.shape[1]:] = p[0], 1
    out = generate(model, ids, tokens, mask)
    return [out[i:i + 1, width:] for i in range(len(prompts))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model, tokenizer = load_model("smollm2")
    hetero_llm.accelerate(model)
    prompts = [prompt_ids(tokenizer, q, chat=True) for q in (QUESTIONS * 2)[:args.threads]]
    total = args.threads * args.tokens
    want = [generate(model, p, args.tokens) for p in prompts]  # also the warm-up
    ways = {"sequential": lambda: [generate(model, p, args.tokens) for p in prompts],
            "threads": lambda: run_threads(model, prompts, args.tokens),
            "threads 1-op": one_op_thread(lambda: run_threads(model, prompts, args.tokens)),
            "2 workers 1-op": one_op_thread(lambda: run_workers(model, prompts, args.tokens)),
            "batched": lambda: run_batched(model, tokenizer, prompts, args.tokens)}
    times = {name: [] for name in ways}
    identical, batched_same = True, []
    for r in range(args.rounds):
        for name, fn in (list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]):
            start = time.perf_counter()
            got = fn()
            times[name].append(time.perf_counter() - start)
            if name != "batched":
                identical &= all(torch.equal(g, w) for g, w in zip(got, want))
            elif name == "batched":
                same = [(g == w[:, p.shape[1]:]).float().mean().item() for g, w, p in zip(got, want, prompts)]
                batched_same.append(statistics.mean(same))
    rates = {name: total / statistics.median(t) for name, t in times.items()}
    print(f"SmolLM2-135M {hetero_llm.__version__}, {args.threads} calls x {args.tokens} tokens, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, {args.rounds} rounds")
    print(f"{'way':<16} {'tok/s':>8} {'vs sequential':>14} {'spread s':>16}")
    for name, t in times.items():
        print(f"{name:<16} {rates[name]:8.1f} {rates[name] / rates['sequential']:13.2f}x "
              f"{min(t):7.2f}-{max(t):<7.2f}")
    print(f"threaded outputs identical to sequential (every round, every way): {identical}; batched (padded) tokens identical: "
          f"{statistics.mean(batched_same):.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rates=rates, times=times, identical=identical,
                                                   batched_same=batched_same, threads=args.threads,
                                                   tokens=args.tokens, torch_threads=torch.get_num_threads(),
                                                   cpus=os.cpu_count()), indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
