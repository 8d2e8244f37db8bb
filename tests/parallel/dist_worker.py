"""Run under torchrun by tests/parallel/test_distributed.py (not collected by pytest).

    torchrun --nproc-per-node 2 tests/parallel/dist_worker.py SCENARIO OUT_DIR

Each rank builds the same tiny random model twice: once accelerated in this one process
(the reference), once with tp=2 or pp=2. It writes what it saw to OUT_DIR/rank<r>.json.
Scenarios "raise" and "hang" make rank 1 fail so the test can time the job's end.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import hetero_llm

VOCAB = 256


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=8, max_position_embeddings=128)
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=4, **common)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(kind)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[3, :5] = 0
    return ids, mask


def same_on_every_rank(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts)


def from_checkpoint(kind: str) -> torch.nn.Module:
    """A meta skeleton; accelerate(checkpoint=) reads each rank's slice from safetensors."""
    import accelerate

    path = Path(os.environ["CHECKPOINT_DIR"]) / kind
    if dist.get_rank() == 0 and not path.exists():
        tiny(kind).save_pretrained(path)
    dist.barrier()
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(tiny(kind).config, attn_implementation="sdpa")
    model.__dict__["_checkpoint"] = path
    return model.eval()


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, VOCAB, (1, 16), generator=g) for _ in range(4)]


def compare(kind: str, options: dict, quantize: str = "none", checkpoint: bool = False, prune="none") -> dict:
    ids, mask = inputs()
    pruning = {"prune": prune, "calibration_data": calibration()} if prune != "none" else {}
    ref = hetero_llm.accelerate(tiny(kind), quantize=quantize, device="cpu", **pruning)
    full = weight_bytes(ref)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want_greedy = ref.generate(ids, **gen)
    want_static = ref.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=6, do_sample=False,
                               pad_token_id=0, cache_implementation="static")
    if quantize != "none":
        fp = tiny(kind)
        with torch.no_grad():
            fp_logits = fp(input_ids=ids, attention_mask=mask).logits
        quant_err = (want - fp_logits).abs().max().item()
    del ref
    if checkpoint:
        skeleton = from_checkpoint(kind)
        model = hetero_llm.accelerate(skeleton, quantize=quantize, device="cpu",
                                      checkpoint=skeleton.__dict__.pop("_checkpoint"), **options)
    else:
        model = hetero_llm.accelerate(tiny(kind), quantize=quantize, device="cpu", **pruning, **options)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    greedy = model.generate(ids, **gen)
    static = model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=6, do_sample=False,
                            pad_token_id=0, cache_implementation="static")
    plan = model.hetero_plan
    try:
        hetero_llm.save(model, f"/tmp/hetero-sharded-save-{dist.get_rank()}")
        save_error = None
    except hetero_llm.DistributedError as err:
        save_error = type(err).__name__
    out = {"save_error": save_error, "logits_checksum": got.double().sum().item(),"max_abs_diff": (got - want).abs().max().item(),
           "greedy_same": torch.equal(greedy, want_greedy), "static_same": torch.equal(static, want_static),
           "same_on_every_rank": same_on_every_rank(got) and same_on_every_rank(greedy),
           "weight_ratio": weight_bytes(model) / full,
           "planned_mb": [r.weight_mb for r in plan.parallel.ranks], "single_mb": plan.parallel.single_weight_mb,
           "shards": sorted({e.shard for e in plan.entries if e.shard})}
    if quantize != "none":
        out["quant_err"] = quant_err
    return out


def expect_error(options: dict) -> dict:
    try:
        hetero_llm.accelerate(tiny("llama"), device="cpu", **options)
    except hetero_llm.HeteroLLMError as err:
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None}


def scenario_correctness() -> dict:
    results = {}
    for kind in ("llama", "qwen2", "gpt2"):
        results[f"{kind}-tp"] = compare(kind, {"tp": 2})
        results[f"{kind}-pp"] = compare(kind, {"pp": 2})
    results["llama-tp-int8"] = compare("llama", {"tp": 2}, quantize="int8")
    results["qwen2-tp-int8-replicated-vocab"] = compare("qwen2", {"tp": 2, "vocab_parallel": False},
                                                       quantize="int8")
    results["gpt2-pp-int8-microbatch2"] = compare("gpt2", {"pp": 2, "micro_batches": 2}, quantize="int8")
    results["llama-tp-checkpoint"] = compare("llama", {"tp": 2}, checkpoint=True)
    results["gpt2-pp-checkpoint"] = compare("gpt2", {"pp": 2}, checkpoint=True)
    results["qwen2-tp-int8"] = compare("qwen2", {"tp": 2}, quantize="int8")
    results["qwen2-tp-int8-checkpoint"] = compare("qwen2", {"tp": 2}, quantize="int8", checkpoint=True)
    results["llama-tp-int8-asym-checkpoint"] = compare("llama", {"tp": 2}, quantize="int8-asym", checkpoint=True)
    # prune, then quantize, then shard: every rank prunes with rank 0's calibration statistics
    structured = hetero_llm.PruneConfig(method="structured", mlp=0.25, heads=0.5)
    results["llama-tp-structured"] = compare("llama", {"tp": 2}, prune=structured)
    results["gpt2-pp-structured"] = compare("gpt2", {"pp": 2}, prune="structured")
    results["qwen2-tp-wanda-int8"] = compare("qwen2", {"tp": 2}, quantize="int8", prune="wanda")
    results["world-mismatch"] = expect_error({"tp": 2, "pp": 2})
    return results


def scenario_failure(kind: str) -> dict:
    model = hetero_llm.accelerate(tiny("llama"), device="cpu", tp=2, timeout_s=float(os.environ["FAULT_TIMEOUT"]))
    ids, _ = inputs()
    model.generate(ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)  # both ranks healthy
    if dist.get_rank() == 1:
        if kind == "raise":
            raise RuntimeError("injected failure on rank 1")
        time.sleep(3600)  # hang: alive but never answering
    started = time.time()
    try:
        model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    except hetero_llm.DistributedError as err:
        print(f"rank 0 stopped after {time.time() - started:.1f}s: {err}", flush=True)
        raise
    return {}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "correctness":
        results = scenario_correctness()
    else:
        results = scenario_failure(scenario)
    rank = int(os.environ["RANK"])
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
