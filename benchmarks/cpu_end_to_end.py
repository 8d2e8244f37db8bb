"""CPU end to end: original vs hetero_llm (int8, int8-asym) vs torch quantize_dynamic.

Prints the before/after table with ratios measured in the same run, interleaved.

    python benchmarks/cpu_end_to_end.py [--repeats 5]
"""
import argparse

import hetero_llm
from hetero_llm.evaluate import format_table, load_model, run_bench, torch_dynamic_int8

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--ppl-tokens", type=int, default=8192)
args = parser.parse_args()

original, tokenizer = load_model(args.model)
variants = {
    "original": original,
    "hetero_llm": hetero_llm.accelerate(load_model(args.model)[0]),
    "hetero_llm int8-asym": hetero_llm.accelerate(load_model(args.model)[0], quantize="int8-asym"),
    "torch-dynamic-int8": torch_dynamic_int8(load_model(args.model)[0]),
}
result = run_bench(variants, tokenizer, repeats=args.repeats, perplexity_tokens=args.ppl_tokens,
                   model_name=args.model)
print(format_table(result))
