"""Pruning on SmolLM2-135M, this CPU, one run: speed, perplexity and save/load exactness.

    python benchmarks/cpu_prune.py [--all] [--repeats 5] [--tokens 64] [--calibration 64] [--json F]

Part 1, speed: structured pruning of 25% and 50% of the MLP channels against the unpruned model
with the same quantization (INT8), decode and prefill measured interleaved (medians), with
perplexity. Part 2, accuracy: perplexity of the dense model and of 50% unstructured pruning by
magnitude and by Wanda with the least-squares update (fp32, so only pruning differs). Part 3:
save -> load of the structured + INT8 model, logits and greedy tokens compared exactly.
The default run took 369 s on 2 cores. `--all` adds the rest of docs/benchmarks.md's table:
25% MLP + 1/3 of the KV groups and fp32 rows in part 1, plain Wanda and the 2:4 patterns in
part 2, structured fp32 and Wanda + INT8 in part 3 (six more prunings, each calibrating anew).
Calibration samples come from a part of the text that the perplexity windows never read.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import hetero_llm
from hetero_llm import PruneConfig
from hetero_llm.evaluate import load_model
from hetero_llm.evaluate.bench import run_bench
from hetero_llm.evaluate.perplexity import calibration_samples, perplexity

PPL_TOKENS = 8192  # --ppl-tokens


def accelerated(calib, **options):
    model, _ = load_model("smollm2")
    t = time.perf_counter()
    uses_data = PruneConfig(**_prune_kwargs(options.get("prune", "none"))).needs_calibration
    hetero_llm.accelerate(model, calibration_data=calib if uses_data else None, **options)
    return model, time.perf_counter() - t


def _prune_kwargs(prune) -> dict:
    return prune.to_dict() if isinstance(prune, PruneConfig) else {"method": prune}


# quantize -> label -> prune; labels marked ALL run only with --all.
ALL = "(--all) "
SPEED_VARIANTS = {
    "int8": {"structured mlp 25%": "structured",
             "structured mlp 50%": PruneConfig(method="structured", mlp=0.5),
             ALL + "structured mlp 25% + 1/3 KV groups": PruneConfig(method="structured", mlp=0.25, heads=1 / 3)},
    ALL + "none": {"structured mlp 25%": "structured"},
}


def chosen(table: dict, everything: bool) -> dict:
    """The entries to run: without --all, those not marked ALL (their labels without the mark)."""
    return {k.removeprefix(ALL): v for k, v in table.items() if everything or not k.startswith(ALL)}


def speed(tok, calib, repeats: int, tokens: int, everything: bool, models: dict) -> dict:
    out = {}
    for quantize, pruned_variants in chosen(SPEED_VARIANTS, everything).items():
        variants = {"unpruned": accelerated(calib, quantize=quantize)[0]}
        prune_s = {}
        for label, prune in chosen(pruned_variants, everything).items():
            variants[label], prune_s[label] = accelerated(calib, quantize=quantize, prune=prune)
        models[quantize] = variants  # part 3 saves the structured ones instead of pruning again
        r = run_bench(variants, tok, repeats=repeats, new_tokens=tokens, prompt_len=256,
                      perplexity_tokens=PPL_TOKENS, progress=False, model_name="smollm2")
        base = r.variants[0]
        rows = {}
        for v in r.variants:
            rows[v.name] = {**v.__dict__, "decode_ratio": v.decode_tok_s / base.decode_tok_s,
                            "prefill_ratio": v.prefill_tok_s / base.prefill_tok_s,
                            "ppl_ratio": v.perplexity / base.perplexity, "prune_s": prune_s.get(v.name, 0.0),
                            "intermediate_size": variants[v.name].config.intermediate_size,
                            "kv_heads": variants[v.name].config.num_key_value_heads}
            print(f"[{quantize}] {v.name:36s} decode {v.decode_tok_s:6.1f} tok/s ({rows[v.name]['decode_ratio']:.3f}x)"
                  f"  prefill {rows[v.name]['prefill_ratio']:.3f}x  ppl {v.perplexity:7.3f}  "
                  f"weights {v.weight_mb:6.1f} MB", flush=True)
        out[quantize] = rows
    return out


ACCURACY = {
    "dense": "none",
    "magnitude 50%": "magnitude",
    ALL + "wanda 50% (plain)": PruneConfig(method="wanda", reconstruct=False),
    "wanda 50% + least-squares update": "wanda",
    ALL + "magnitude 2:4": "2:4",
    ALL + "wanda 2:4 + least-squares update": PruneConfig(method="wanda", pattern="2:4"),
}


def accuracy(tok, calib, everything: bool) -> dict:
    out = {}
    for label, prune in chosen(ACCURACY, everything).items():
        model, secs = accelerated(calib, quantize="none", prune=prune)
        ppl = perplexity(model, tok, max_tokens=PPL_TOKENS, progress=False).perplexity
        report = getattr(model, "hetero_prune", None)
        out[label] = {"perplexity": ppl, "sparsity": report.sparsity if report else 0.0, "prune_s": secs,
                      "per_layer": [[r.name, r.zeros] for r in report.layers] if report else []}
        print(f"{label:34s} ppl {ppl:8.3f}  zeros {100 * out[label]['sparsity']:5.1f}%  ({secs:.0f} s)", flush=True)
    dense = out["dense"]["perplexity"]
    for v in out.values():
        v["ratio_to_dense"] = v["perplexity"] / dense
    return out


SAVE_LOAD = {  # label -> (part 1's model with these options, if it ran, else options to prune anew)
    ALL + "structured fp32": (("none", "structured mlp 25%"), dict(quantize="none", prune="structured")),
    "structured + int8": (("int8", "structured mlp 25%"), dict(quantize="int8", prune="structured")),
    ALL + "wanda 50% + int8": (None, dict(quantize="int8", prune="wanda")),
}


def save_load(tok, calib, everything: bool, models: dict) -> dict:
    ids = tok("The three primary colors are", return_tensors="pt").input_ids
    out = {}
    for label, (speed_model, options) in chosen(SAVE_LOAD, everything).items():
        quantize, name = speed_model or (None, None)
        model = models.get(quantize, {}).get(name) or accelerated(calib, **options)[0]
        with tempfile.TemporaryDirectory() as d, torch.inference_mode():
            hetero_llm.save(model, d)
            loaded = hetero_llm.load(d)
            same_logits = torch.equal(model(ids).logits, loaded(ids).logits)
            same_text = torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False),
                                    loaded.generate(ids, max_new_tokens=16, do_sample=False))
        out[label] = {"logits_identical": same_logits, "generate_identical": same_text}
        print(f"save/load {label}: logits identical {same_logits}, generate identical {same_text}", flush=True)
    return out


def main() -> None:
    global PPL_TOKENS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every configuration of docs/benchmarks.md's table")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=64, help="calibration samples (default 64)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    ap.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS, help=f"perplexity text (default {PPL_TOKENS})")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    PPL_TOKENS = args.ppl_tokens
    _, tok = load_model("smollm2")
    calib = calibration_samples(tok, n=args.calibration, seq_len=args.seq_len)
    start, models = time.perf_counter(), {}
    result = {"settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "speed": speed(tok, calib, args.repeats, args.tokens, args.all, models),
              "accuracy": accuracy(tok, calib, args.all), "save_load": save_load(tok, calib, args.all, models)}
    result["seconds"] = time.perf_counter() - start
    print(f"done in {result['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
