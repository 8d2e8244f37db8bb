"""Every quantization scheme on the real model, side by side in one interleaved run.

fp32, W8A16 (sym/asym x per channel/per group/per tensor), W8A8 (no smoothing,
SmoothQuant, SmoothQuant + fp outlier channels) and torch's quantize_dynamic:
decode and 512-token prefill speed, resident weight memory and perplexity.

    python benchmarks/cpu_quant_schemes.py [--repeats 3] [--json out.json]
    (sizes: --new-tokens 64, --prompt-len 512, --ppl-tokens 8192, --calibration 16)
"""
import argparse

import hetero_llm
from hetero_llm.config import QuantConfig
from hetero_llm.evaluate import format_table, load_model, run_bench, save_json, torch_dynamic_int8
from hetero_llm.evaluate.perplexity import calibration_samples

SCHEMES = {
    "int8 (default)": QuantConfig(scheme="int8"),
    "int8-asym": QuantConfig(scheme="int8-asym"),
    "int8 g128": QuantConfig(scheme="int8", granularity="group", group_size=128),
    "int8-asym g128": QuantConfig(scheme="int8-asym", granularity="group", group_size=128),
    "int8 per-tensor": QuantConfig(scheme="int8", granularity="tensor"),
    "w8a8 no smoothing": QuantConfig(scheme="w8a8", smooth_alpha=0.0),
    "w8a8 smooth 0.5": QuantConfig(scheme="w8a8", smooth_alpha=0.5),
    "w8a8 smooth 0.5 + 8 fp channels": QuantConfig(scheme="w8a8", smooth_alpha=0.5, outlier_channels=8),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens timed for decode")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens timed for prefill")
    parser.add_argument("--calibration", type=int, default=16, help="W8A8 calibration samples of 256 tokens")
    parser.add_argument("--only", nargs="*", help="scheme names to run (default: all)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    original, tokenizer = load_model(args.model)
    # Calibration text comes from after the perplexity text, so they never overlap.
    calibration = calibration_samples(tokenizer, n=args.calibration, seq_len=256)
    variants = {"fp32": original}
    for name, q in SCHEMES.items():
        if args.only and name not in args.only:
            continue
        model = load_model(args.model)[0]
        data = calibration if q.needs_calibration else None
        variants[name] = hetero_llm.accelerate(model, quantize=q, calibration_data=data)
    variants["torch quantize_dynamic"] = torch_dynamic_int8(load_model(args.model)[0])
    result = run_bench(variants, tokenizer, repeats=args.repeats, new_tokens=args.new_tokens,
                       prompt_len=args.prompt_len, perplexity_tokens=args.ppl_tokens, model_name=args.model)
    print(format_table(result))
    qd = "torch quantize_dynamic"
    for name in variants:
        if name in ("fp32", qd):
            continue
        print(f"{name:34s} decode vs quantize_dynamic {result.ratio(name, 'decode_tok_s', qd):.2f}x  "
              f"prefill vs fp32 {result.ratio(name, 'prefill_tok_s'):.2f}x  "
              f"weights vs fp32 {result.ratio(name, 'weight_mb'):.3f}x")
    if args.json:
        save_json(result, args.json)


if __name__ == "__main__":
    main()
